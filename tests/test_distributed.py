"""Two gloo processes on loopback give the same UL step as one process."""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from problems import DTYPE, Linear, ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import Implicit, Reverse


def task_loss(state):
    return 0.5 * ((state["ll_model"](state["data"]) - state["target"]) ** 2).mean()


def task_batch():
    g = torch.Generator().manual_seed(5)
    return {
        "train": (
            torch.randn(5, 12, 4, generator=g, dtype=DTYPE),
            torch.randn(5, 12, generator=g, dtype=DTYPE),
        ),
        "test": (
            torch.randn(5, 7, 4, generator=g, dtype=DTYPE),
            torch.randn(5, 7, generator=g, dtype=DTYPE),
        ),
    }


def meta_step() -> list[torch.Tensor]:
    """One MAML step (Adam) on a batch of 5 tasks: uneven shares over 2 processes."""
    torch.manual_seed(0)
    net = Linear(4, torch.randn(4, dtype=DTYPE))
    ll = GradientDescent(task_loss, net, net, lr=0.1, iters=3)
    problem = BilevelProblem(
        ll, Reverse(task_loss, net, task_loss, net), torch.optim.Adam(net.parameters(), lr=0.01)
    )
    problem.meta_step(task_batch())
    problem.meta_step(task_batch())
    return [p.detach().clone() for p in net.parameters()]


def hyper_step() -> list[torch.Tensor]:
    """Two Implicit steps on one hyperparameter problem: the UL data is sharded."""
    p = ridge(n=61)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=100)
    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.5, k=10)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.5))
    problem.step(p.train, p.val)
    problem.step(p.train, p.val)
    return [p.ul_model.log_l2.detach().clone()]


def _worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    join_group(rank, world, rendezvous)
    try:
        torch.save({"meta": meta_step(), "hyper": hyper_step()}, f"{out}.{rank}")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def join_group(rank: int, world: int, rendezvous: str, timeout_s: float | None = None) -> None:
    """Join a gloo group of ``world`` processes that meet in the file ``rendezvous`` (one per
    test, in its temporary folder): no TCP port to pick, which tests running side by side
    (pytest-xdist) or gloo's own connections could take between its choice and its use."""
    options = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, **options
    )


def test_two_processes_match_one(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    single = {"meta": meta_step(), "hyper": hyper_step()}
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for key in ("meta", "hyper"):
        for got in ranks:
            for a, b in zip(got[key], single[key], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
        for a, b in zip(ranks[0][key], ranks[1][key], strict=True):
            assert torch.equal(a, b)  # every process took the same step


# --- faults on one process only -------------------------------------------------------------


def _outcome(action) -> str:
    """What ``action`` did: "ok", or the name of the exception it raised."""
    try:
        action()
    except BaseException as error:
        return type(error).__name__
    return "ok"


def _faults_worker(rank: int, world: int, rendezvous: str, out: str, ckpt: str) -> None:
    """A NaN, a diverging LL and an error on rank 1 only, and a SIGTERM to rank 1 only: every
    rank skips, raises or stops together (a rank left in a collective would hang: gloo's
    timeout below turns that into an error, and the test's deadline into a failure)."""
    import signal

    from bilevel.ll import LowerLevelDivergenceError

    join_group(rank, world, rendezvous, timeout_s=60)
    results: dict = {}
    try:
        p = ridge(n=61)
        bad_val = (p.val[0].clone(), p.val[1])
        bad_val[0][1, 2] = float("nan")  # row 1: in rank 1's share of the UL batch only

        def problem(policy, ll_objective=ridge_ll):
            ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=0.5, iters=30)
            # a series solver: linear in the UL objective, so the UL batch is split by
            # examples and the NaN reaches rank 1's share only (CG runs the whole batch)
            ul = Implicit(ridge_ul, p.ul_model, ll_objective, p.ll_model, k=5, method="neumann")
            opt = torch.optim.SGD(p.ul_model.parameters(), lr=0.5)
            return BilevelProblem(ll, ul, opt, on_nonfinite=policy)

        skipping = problem("skip")
        before = p.ul_model.log_l2.detach().clone()
        results["nan skip"] = _outcome(lambda: skipping.step(p.train, bad_val))
        results["nan skip unchanged"] = torch.equal(p.ul_model.log_l2.detach(), before)
        results["nan skip then good"] = _outcome(lambda: skipping.step(p.train, p.val))
        results["skipped"] = skipping.skipped_steps
        results["after"] = p.ul_model.log_l2.detach().clone()
        raising = problem("raise")
        results["nan raise"] = _outcome(lambda: raising.step(p.train, bad_val))

        # a meta-batch of 2 tasks: task 1 (rank 1's) has an LL that diverges at lr=0.5
        net = Linear(4, torch.zeros(4, dtype=DTYPE))
        batch = task_batch()
        (tx, ty), test = batch["train"], batch["test"]
        tx = tx[:2].clone()
        tx[1] *= 6.0
        batch = {"train": (tx, ty[:2]), "test": (test[0][:2], test[1][:2])}
        for policy in ("skip", "raise"):
            ll = GradientDescent(task_loss, net, net, lr=0.5, iters=20)
            meta = BilevelProblem(
                ll,
                Reverse(task_loss, net, task_loss, net),
                torch.optim.SGD(net.parameters(), lr=0.1),
                on_nonfinite=policy,
            )
            results[f"diverging {policy}"] = _outcome(lambda m=meta: m.meta_step(batch))
            results[f"diverging {policy} skipped"] = meta.skipped_steps
        results["diverging raise is divergence"] = False
        try:
            meta.meta_step(batch)
        except LowerLevelDivergenceError:
            results["diverging raise is divergence"] = True
        except FloatingPointError:
            pass

        def failing(state):  # an error that is not numerical, on rank 1 only
            if dist.get_rank() == 1:
                raise ValueError("a bug in rank 1's objective")
            return ridge_ll(state)

        results["error"] = _outcome(lambda: problem("skip", failing).step(p.train, p.val))

        # SIGTERM to rank 1 only, while it fetches the batch of step 2: both stop after
        # step 3, rank 0 saves
        stopping = problem("raise")

        def data(step):
            if step == 2 and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return p.train, p.val

        def run():
            stopping.run(data, steps=10, checkpoint=ckpt, checkpoint_every=100, progress=False)

        results["sigterm"] = _outcome(run)
        results["sigterm step"] = stopping.step_count
        dist.barrier()  # rank 0 has saved
        results["saved step"] = torch.load(ckpt, weights_only=True)["step"]
        dist.barrier()
        results["resumed"] = _outcome(run)  # the same call resumes, to the end
        results["resumed step"] = stopping.step_count
        torch.save(results, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_fault_on_one_process_is_met_by_all(tmp_path):
    out, ckpt = str(tmp_path / "faults"), str(tmp_path / "run.pt")
    rendezvous = str(tmp_path / "rendezvous")
    context = mp.start_processes(
        _faults_worker, args=(2, rendezvous, out, ckpt), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.time() + 240
    try:
        while not context.join(timeout=1):
            assert time.time() < deadline, "a process hangs in a collective"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in range(2))
    # a NaN in rank 1's share: both skip (and count it), the UL is untouched, and the next
    # step is taken by both; with "raise" both raise
    assert r0["nan skip"] == r1["nan skip"] == "ok"
    assert r0["nan skip unchanged"] and r1["nan skip unchanged"]
    assert r0["nan skip then good"] == r1["nan skip then good"] == "ok"
    assert r0["skipped"] == r1["skipped"] == 1
    assert torch.equal(r0["after"], r1["after"])
    assert r0["nan raise"] == r1["nan raise"] == "FloatingPointError"
    # an LL diverging on rank 1's task only: both skip, or both raise
    assert r0["diverging skip"] == r1["diverging skip"] == "ok"
    assert r0["diverging skip skipped"] == r1["diverging skip skipped"] == 1
    assert r0["diverging raise skipped"] == r1["diverging raise skipped"] == 0
    assert r1["diverging raise"] == "LowerLevelDivergenceError"  # its own error
    assert r0["diverging raise"] == "FloatingPointError"  # told by rank 1's flag
    assert r1["diverging raise is divergence"] and not r0["diverging raise is divergence"]
    # any other error on one rank: it raises its own, the other stops with it (not skipped)
    assert (r0["error"], r1["error"]) == ("PeerError", "ValueError")
    # SIGTERM to rank 1 alone: both stop after the same step, and rank 0 saved it
    assert r0["sigterm"] == r1["sigterm"] == "Interrupted"
    assert r0["sigterm step"] == r1["sigterm step"] == 3
    assert r0["saved step"] == r1["saved step"] == 3
    assert r0["resumed"] == r1["resumed"] == "ok"
    assert r0["resumed step"] == r1["resumed step"] == 10

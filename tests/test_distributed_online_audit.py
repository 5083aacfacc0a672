"""Audit of ``bilevel.distributed`` (through :class:`bilevel.BilevelProblem`) and of
``bilevel.online``.

Distributed: one group of 2 and one of 3 ``gloo`` processes on loopback (spawned once per
module, each running every case of its size), against the same cases run by one process:
the hypergradient, the UL loss and the UL step must be those of one process on the whole
batch (float64, round-off tolerance), and what the processes keep (generator states,
buffers, checkpoints) must be equal on all of them. Cases not in ``test_distributed.py``:
a meta-batch of 3 over 2 processes and of 2 over 3 (a process with no task), a single task
split unevenly (7 rows over 3), nested UL data and a ``None`` target, methods whose
hypergradient is not linear in the UL objective (PTT, BDA's LL, unconverged CG),
StochasticImplicit (single task and task batches), the refusal of stateful methods, a
non-finite value in one share of three, batch-norm buffers, and a checkpoint read as soon
as ``run`` returns.

Online: RTHO and online truncated reverse against a hand-written float64 reference
(closed-form ridge gradients and tangents) with LL and UL batches that change shape from
call to call, a step size computed from the UL model, a learned per-step schedule and a run
whose length is not a multiple of ``hyper_every``.
"""

from __future__ import annotations

import math
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from problems import DTYPE, FeatureL2, Linear, ridge, ridge_ll, ridge_ul
from test_distributed import join_group
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import BDA, GradientDescent
from bilevel.online import OnlineHypergradient
from bilevel.ul import (
    DM,
    PTT,
    SABA,
    SOBA,
    Forward,
    Implicit,
    Reverse,
    StochasticImplicit,
    Truncated,
)

RTOL = 1e-10


def close(got, want, what: str) -> None:
    """Equal to float64 round-off (relative to the largest entry of ``want``)."""
    for a, b in zip(got, want, strict=True):
        scale = float(b.abs().max()) if b.numel() else 0.0
        err = float((a - b).abs().max()) if b.numel() else 0.0
        assert err <= RTOL * max(scale, 1e-300), f"{what}: off by {err:.3g} (scale {scale:.3g})"


def clone(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


# ------------------------------------------------------------------ the cases (any process)


def task_loss(state):
    return 0.5 * ((state["ll_model"](state["data"]) - state["target"]) ** 2).mean()


def task_batch(n: int, d: int = 4) -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "train": (
            torch.randn(n, 12, d, generator=g, dtype=DTYPE),
            torch.randn(n, 12, generator=g, dtype=DTYPE),
        ),
        "test": (
            torch.randn(n, 7, d, generator=g, dtype=DTYPE),
            torch.randn(n, 7, generator=g, dtype=DTYPE),
        ),
    }


def meta_case(n_tasks: int) -> dict:
    """MAML-style (Forward), SGD: the meta-hypergradient, then one meta-step."""
    net = Linear(4, torch.linspace(-0.5, 0.7, 4, dtype=DTYPE))
    ll = GradientDescent(task_loss, net, net, lr=0.1, iters=3)
    problem = BilevelProblem(
        ll, Forward(task_loss, net, task_loss, net), torch.optim.SGD(net.parameters(), lr=0.3)
    )
    batch = task_batch(n_tasks)
    h = clone(problem.meta_hypergradient(batch))
    loss = problem.meta_step(batch)
    ll_loss = problem.last_ll_loss.clone()
    return {"h": h, "loss": loss.clone(), "ll_loss": ll_loss, "after": clone(net.parameters())}


def counting(objective, seen: list):
    def wrapped(state):
        seen.append(state["data"].shape[0] if torch.is_tensor(state["data"]) else -1)
        return objective(state)

    return wrapped


def single_case(kind: str) -> dict:
    """One hyperparameter problem of 7 UL rows: the hypergradient, then an Adam UL step."""
    p = ridge(n=7, d=6)
    seen: list = []
    ul_objective = counting(ridge_ul, seen)
    if kind == "bda":
        ll = BDA(
            ridge_ll,
            p.ll_model,
            p.ul_model,
            lr=0.3,
            iters=10,
            ul_objective=ul_objective,
            alpha=0.5,
            alpha_decay=0.9,
        )
        ul = Reverse(ul_objective, p.ul_model, ridge_ll, p.ll_model)
    else:
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=10)
        make = {
            "reverse": lambda: Reverse(ul_objective, p.ul_model, ridge_ll, p.ll_model),
            "cg": lambda: Implicit(
                ul_objective, p.ul_model, ridge_ll, p.ll_model, k=2, stationarity_warning=None
            ),
            "neumann": lambda: Implicit(
                ul_objective,
                p.ul_model,
                ridge_ll,
                p.ll_model,
                k=30,
                method="neumann",
                stationarity_warning=None,
            ),
            "sid": lambda: StochasticImplicit(
                ul_objective, p.ul_model, ridge_ll, p.ll_model, steps=4, batches=3, seed=1
            ),
        }
        ul = make[kind]()
    problem = BilevelProblem(ll, ul, torch.optim.Adam(p.ul_model.parameters(), lr=0.05))
    h = clone(problem.hypergradient(p.train, p.val))
    seen_in_hypergradient = sorted(set(seen))
    loss = problem.step(p.train, p.val)
    out = {
        "h": h,
        "loss": loss.clone(),
        "after": clone(p.ul_model.parameters()),
        "rows": seen_in_hypergradient,
    }
    if kind == "sid":
        out["generator"] = ul.generator.get_state().clone()
        out["draws"] = ul.draws
    return out


def ptt_case() -> dict:
    """PTT on one LL weight moving from 0 towards 1: the UL loss of rows 0 and 2 (target 2)
    falls along the run, that of row 1 (target -0.2) rises, so the iterate with the largest
    UL loss is the first for the whole batch and for rank 0's rows {0, 2}, the last for
    rank 1's row {1}."""
    ll_model, ul_model = Linear(1), FeatureL2(1, 0.01)
    train = (torch.ones(4, 1, dtype=DTYPE), torch.ones(4, dtype=DTYPE))
    val = (torch.ones(3, 1, dtype=DTYPE), torch.tensor([2.0, -0.2, 2.0], dtype=DTYPE))
    ll = GradientDescent(ridge_ll, ll_model, ul_model, lr=0.3, iters=5)
    ul = PTT(ridge_ul, ul_model, ridge_ll, ll_model)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=0.1))
    return {"h": clone(problem.hypergradient(train, val)), "step": ul.diagnostics["ptt_step"]}


def masked_ul(state):
    x, m = state["data"]["x"], state["data"]["m"]
    residual = state["ll_model"](x) - state["target"]
    return 0.5 * (m * residual**2).mean()


def untargeted_ul(state):
    assert state["target"] is None
    return 0.5 * (state["ll_model"](state["data"]) ** 2).mean()


def nested_case(kind: str) -> dict:
    """Reverse with UL data ``{"x": rows, "m": per-row weights}``, or with no UL target."""
    p = ridge(n=7, d=6)
    if kind == "dict":
        mask = torch.linspace(0.5, 1.5, 7, dtype=DTYPE)
        ul_objective, val = masked_ul, ({"x": p.val[0], "m": mask}, p.val[1])
    else:
        ul_objective, val = untargeted_ul, (p.val[0], None)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=10)
    problem = BilevelProblem(
        ll,
        Reverse(ul_objective, p.ul_model, ridge_ll, p.ll_model),
        torch.optim.SGD(p.ul_model.parameters(), lr=0.5),
    )
    h = clone(problem.hypergradient(p.train, val))
    loss = problem.step(p.train, val)
    return {"h": h, "loss": loss.clone(), "after": clone(p.ul_model.parameters())}


def sid_meta_case(n_tasks: int) -> dict:
    """StochasticImplicit (minibatches of 5 of 12 rows) on a task batch, two meta-steps."""
    p = ridge(d=4)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.2, iters=15)
    ul = StochasticImplicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, steps=3, batches=5, seed=2)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.5))
    batch = task_batch(n_tasks)
    first = problem.meta_step(batch)
    h = clone(problem.meta_hypergradient(batch))
    second = problem.meta_step(batch)
    return {
        "losses": torch.stack([first, second]),
        "h": h,
        "after": clone(p.ul_model.parameters()),
        "generator": ul.generator.get_state().clone(),
        "draws": ul.draws,
    }


def stateful_case(kind: str) -> str:
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=1)
    args = (ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    ul = {
        "dm": lambda: DM(*args),
        "soba": lambda: SOBA(*args, batch_size=5, seed=3),
        "saba": lambda: SABA(*args, batch_size=5, seed=3),
    }[kind]()
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
    before = clone([*p.ul_model.parameters(), *p.ll_model.parameters()])
    try:
        problem.step(p.train, p.val)
    except ValueError as error:
        after = clone([*p.ul_model.parameters(), *p.ll_model.parameters()])
        untouched = all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
        return f"refused: {error}" if untouched else "refused after moving the state"
    return "ran"


class Trunk(nn.Module):
    """A batch-normalized representation (the UL model): its running statistics move with
    every forward pass in training mode, on each process with its own tasks."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4, dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.reshape(-1, 4)).reshape(x.shape)


def head_loss(state):
    z = state["ul_model"](state["data"])
    w = state["ll_model"].w
    return 0.5 * ((state["ll_model"](z) - state["target"]) ** 2).mean() + 0.05 * (w * w).sum()


def buffers_case(which: list[int] | None = None) -> dict:
    """One meta-step of a hyper-representation (trunk: UL, head: LL) on tasks 0, 1, 2 (or
    on the tasks ``which`` only)."""
    trunk, head = Trunk(), Linear(4)
    ll = GradientDescent(head_loss, head, trunk, lr=0.1, iters=3)
    problem = BilevelProblem(
        ll, Reverse(head_loss, trunk, head_loss, head), torch.optim.SGD(trunk.parameters(), lr=0.1)
    )
    batch = task_batch(3)
    if which is not None:
        batch = {k: (x[which], y[which]) for k, (x, y) in batch.items()}
    problem.meta_step(batch)
    return {"buffers": clone(trunk.buffers()), "after": clone(trunk.parameters())}


def checkpoint_case(path: str, slow_rank0_save: bool) -> dict:
    """``run`` to 4 steps (a checkpoint every 2; rank 0's last save slowed by half a second,
    as on a busy shared file system), the checkpoint's step as read the moment ``run``
    returns, then the same call to 6 steps (which resumes from the checkpoint)."""
    p = ridge(n=7, d=6)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=10)
    problem = BilevelProblem(
        ll,
        Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model),
        torch.optim.Adam(p.ul_model.parameters(), lr=0.05),
    )
    saves = []
    original = problem.save_checkpoint

    def save(target):
        saves.append(problem.step_count)
        if slow_rank0_save and problem.step_count == 4:
            time.sleep(0.5)
        original(target)

    problem.save_checkpoint = save

    def data(step):
        return p.train, p.val

    problem.run(data, steps=4, checkpoint=path, checkpoint_every=2, progress=False)
    seen = torch.load(path, weights_only=True)["step"]
    if dist.is_initialized():
        dist.barrier()  # (the test's own: no process resumes before the others have read)
    problem.run(data, steps=6, checkpoint=path, checkpoint_every=2, progress=False)
    return {"seen": seen, "saves": saves, "after": clone(p.ul_model.parameters())}


def skip_case() -> dict:
    """A NaN in row 2 of 7 (rank 2's share over 3 processes), ``on_nonfinite="skip"``, Adam:
    the step is skipped and the next, good, step is taken."""
    p = ridge(n=7, d=6)
    bad = (p.val[0].clone(), p.val[1])
    bad[0][2, 1] = float("nan")
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=10)
    optimizer = torch.optim.Adam(p.ul_model.parameters(), lr=0.05)
    problem = BilevelProblem(
        ll, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model), optimizer, on_nonfinite="skip"
    )
    before = clone(p.ul_model.parameters())
    skipped_loss = problem.step(p.train, bad)
    untouched = all(torch.equal(a, b) for a, b in zip(p.ul_model.parameters(), before, strict=True))
    problem.step(p.train, p.val)
    state = optimizer.state[p.ul_model.log_l2]
    return {
        "skipped_loss_nan": bool(torch.isnan(skipped_loss)),
        "untouched": untouched,
        "skipped": problem.skipped_steps,
        "adam_steps": float(state["step"]),
        "after": clone(p.ul_model.parameters()),
    }


def outcome(action):
    """The case's result, or the error it raised (as text: the processes report it)."""
    try:
        return action()
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def cases(world: int, folder: str) -> dict:
    r = dist.get_rank() if dist.is_initialized() else "single"
    if world == 2:
        out = {
            f"single {k}": outcome(lambda k=k: single_case(k))
            for k in ("reverse", "cg", "bda", "neumann", "sid")
        }
        out["ptt shares"] = outcome(ptt_case)
        out["meta 3"] = outcome(lambda: meta_case(3))
        out["nested dict"] = outcome(lambda: nested_case("dict"))
        out["nested none"] = outcome(lambda: nested_case("none"))
        out["sid meta 3"] = outcome(lambda: sid_meta_case(3))
        for kind in ("dm", "soba", "saba"):
            out[f"stateful {kind}"] = outcome(lambda kind=kind: stateful_case(kind))
        out["buffers"] = outcome(buffers_case)
        path = os.path.join(folder, f"run-{world}-{'group' if r != 'single' else 'single'}.pt")
        out["checkpoint"] = outcome(lambda: checkpoint_case(path, slow_rank0_save=r == 0))
        return out
    return {
        "meta 2": outcome(lambda: meta_case(2)),
        "single reverse": outcome(lambda: single_case("reverse")),
        "skip": outcome(skip_case),
        "sid meta 4": outcome(lambda: sid_meta_case(4)),
    }


# ------------------------------------------------------------------------- the processes


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, world, os.path.join(folder, "rendezvous"), timeout_s=60)
    try:
        torch.save(cases(world, folder), os.path.join(folder, f"result.{rank}"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(world: int, folder: str) -> list[dict]:
    context = mp.start_processes(
        _worker, args=(world, folder), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.time() + 150
    try:
        while not context.join(timeout=1):
            assert time.time() < deadline, "a process hangs in a collective"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    files = [os.path.join(folder, f"result.{r}") for r in range(world)]
    return [torch.load(f, weights_only=True) for f in files]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """(results of each of 2 processes, results of one process)."""
    folder = str(tmp_path_factory.mktemp("two"))
    ranks = _launch(2, folder)
    return ranks, cases(2, folder)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("three"))
    ranks = _launch(3, folder)
    return ranks, cases(3, folder)


def results(group, key):
    ranks, single = group
    for r, got in enumerate(ranks):
        assert not isinstance(got[key], str), f"rank {r}: {got[key]}"
    assert not isinstance(single[key], str), single[key]
    return [got[key] for got in ranks], single[key]


def same_as_one_process(group, key, fields=("h", "loss", "after")) -> None:
    ranks, single = results(group, key)
    for r, got in enumerate(ranks):
        for field in fields:
            want = single[field] if isinstance(single[field], list) else [single[field]]
            have = got[field] if isinstance(got[field], list) else [got[field]]
            close(have, want, f"{key}: {field} on rank {r} against one process")
    for got in ranks[1:]:  # every process took the same step
        for a, b in zip(got["after"], ranks[0]["after"], strict=True):
            assert torch.equal(a, b)


# ------------------------------------------------------------- distributed: what matches


def test_meta_batch_of_three_over_two_processes_matches_one_process(two):
    same_as_one_process(two, "meta 3", ("h", "loss", "ll_loss", "after"))


def test_meta_batch_smaller_than_the_world_leaves_a_process_without_task(three):
    """2 tasks over 3 processes: rank 2 runs none and adds zeros."""
    same_as_one_process(three, "meta 2", ("h", "loss", "ll_loss", "after"))


def test_a_single_task_is_split_by_examples_and_weighted_exactly(two, three):
    """7 UL rows: 4/3 over 2 processes, 3/2/2 over 3; each share's mean weighted by its
    fraction gives the whole batch's hypergradient, loss and Adam step. The UL objective
    saw only the process's rows: the split really happened."""
    same_as_one_process(two, "single reverse")
    same_as_one_process(three, "single reverse")
    assert [got["single reverse"]["rows"] for got in two[0]] == [[4], [3]]
    assert [got["single reverse"]["rows"] for got in three[0]] == [[3], [2], [2]]


def test_a_series_solver_splits_and_matches_one_process(two):
    """Neumann is linear in the right-hand side: split, and exact."""
    same_as_one_process(two, "single neumann")


def test_stochastic_implicit_on_one_task_draws_the_same_minibatches_everywhere(two):
    """One task: every process draws the same minibatches (same seed, same LL batch); the
    SGD solve is linear in v, so the weighted shares sum to the whole; the generators stay
    equal to one process's."""
    same_as_one_process(two, "single sid")
    ranks, single = results(two, "single sid")
    for got in ranks:
        assert torch.equal(got["generator"], single["generator"])
        assert got["draws"] == single["draws"]


def test_stateful_methods_are_refused_on_every_process_before_moving_anything(two):
    ranks, single = two
    for kind, name in (("dm", "DM"), ("soba", "SOBA"), ("saba", "SABA")):
        for got in ranks:
            message = got[f"stateful {kind}"]
            assert message.startswith(f"refused: {name} keeps one LL state"), message
            assert "torch.distributed" in message
        assert single[f"stateful {kind}"] == "ran"


def test_a_nonfinite_value_in_one_share_of_three_is_skipped_by_all(three):
    """NaN in rank 2's rows only: every process skips (one process skips too: the NaN is in
    its batch), Adam is not stepped, and the next step is one process's."""
    ranks, single = results(three, "skip")
    for got in ranks:
        assert got["skipped_loss_nan"] and got["untouched"]
        assert got["skipped"] == single["skipped"] == 1
        assert got["adam_steps"] == single["adam_steps"] == 1.0
        close(got["after"], single["after"], "after the skipped and the good step")


# ------------------------------------------------------- distributed: bugs (fail before fix)


@pytest.mark.parametrize("key", ["single bda", "single cg"])
def test_methods_not_linear_in_the_ul_objective_match_one_process(two, key):
    """BUG: a single task's UL batch is split by examples for every method, which is exact
    only when the hypergradient is linear in the UL objective. BDA's LL steps descend on
    each share's UL loss, and CG stopped after k=2 iterations builds its Krylov space from
    each share's v: the weighted sum is not the whole batch's hypergradient (before the fix:
    off by 8% for BDA, 52% for CG, relative to the largest entry; PTT: the next test)."""
    same_as_one_process(two, key)


def test_ptt_picks_the_step_of_the_whole_ul_batch(two):
    """BUG: rank 1's share alone has its largest UL loss at the last LL step (5), the whole
    batch at the first (1): before the fix rank 1 back-propagated from step 5 and the
    hypergradient was -1.6e-3 where one process gives 0."""
    ranks, single = results(two, "ptt shares")
    assert single["step"] == 1
    for got in ranks:
        assert got["step"] == 1
        close(got["h"], single["h"], "PTT hypergradient")


@pytest.mark.parametrize("key", ["nested dict", "nested none"])
def test_nested_ul_data_and_a_missing_target_split_like_tensors(two, key):
    """BUG: the split sliced ``val_x[r::world]`` and ``val_y[r::world]`` directly: UL data
    given as a dict raised ``TypeError: unhashable type: 'slice'`` and a ``None`` target
    (allowed by the runner) ``TypeError: 'NoneType' object is not subscriptable``, on every
    process, where one process runs them."""
    same_as_one_process(two, key)


@pytest.mark.parametrize(("group", "key"), [("two", "sid meta 3"), ("three", "sid meta 4")])
def test_stochastic_implicit_on_a_task_batch_matches_one_process(group, key, request):
    """BUG: each process drew from its own copy of the method's generator, from the same
    start, for its own tasks: task 1 (rank 1's first) got task 0's minibatches, the UL
    parameters after two meta-steps were 2e-5 (relative) away from one process's, and the
    generators ended in different states on the two processes (8 and 16 draws against 24),
    so that the checkpoint (rank 0's) resumed every process with rank 0's state."""
    g = request.getfixturevalue(group)
    same_as_one_process(g, key, ("losses", "h", "after"))
    ranks, single = results(g, key)
    for got in ranks:
        assert got["draws"] == single["draws"]
        assert torch.equal(got["generator"], single["generator"])


def test_buffers_are_rank_zeros_on_every_process(two):
    """BUG: batch-norm running statistics of the UL model move with every forward pass, on
    each process with its own tasks, and nothing made them agree: after one meta-step the
    two processes held different running means (and num_batches_tracked 2 and 1), and only
    rank 0's reached the checkpoint. After the fix every process holds rank 0's, which are
    those of one process run on rank 0's tasks (0 and 2)."""
    ranks, _ = results(two, "buffers")
    for got in ranks[1:]:
        for a, b in zip(got["buffers"], ranks[0]["buffers"], strict=True):
            assert torch.equal(a, b)
    own = buffers_case(which=[0, 2])
    for a, b in zip(ranks[0]["buffers"], own["buffers"], strict=True):
        if a.is_floating_point():
            close([a], [b], "rank 0's running statistics")
        else:
            assert torch.equal(a, b)


def test_the_checkpoint_is_written_before_any_process_returns_from_run(two):
    """BUG: rank 0 writes the last checkpoint while the others have already returned from
    ``run``: a process that reads it then (or calls ``run`` again, which resumes from it)
    gets the previous one, step 2 instead of 4, and would resume 2 steps behind rank 0,
    pairing its all-reduces with rank 0's at other UL parameters. Only rank 0 writes; the
    resumed run ends where one process's 6 steps end."""
    ranks, single = results(two, "checkpoint")
    assert [got["seen"] for got in ranks] == [4, 4]
    assert ranks[0]["saves"] == [2, 4, 6] and ranks[1]["saves"] == []
    for got in ranks:
        close(got["after"], single["after"], "after 4 steps and a resumed 2")


# ------------------------------------------------------------------- online: hand reference

D = 3
UL_LR = 0.3


class Hypers(nn.Module):
    def __init__(self, schedule: int | None = None) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.tensor([-1.0, -0.5, -2.0], dtype=DTYPE))
        if schedule is None:
            self.log_lr = nn.Parameter(torch.tensor(-1.5, dtype=DTYPE))
        else:
            self.lrs = nn.Parameter(torch.linspace(0.3, 0.1, schedule, dtype=DTYPE))


def online_ll(state):
    residual = state["ll_model"](state["data"]) - state["target"]
    w = state["ll_model"].w
    return 0.5 * (residual**2).mean() + 0.5 * (state["ul_model"].log_l2.exp() * w * w).sum()


def online_ul(state):
    residual = state["ll_model"](state["data"]) - state["target"]
    return 0.5 * (residual**2).mean()


def _rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_true = torch.tensor([0.7, -1.2, 0.4], dtype=DTYPE)
    x = torch.randn(n, D, generator=g, dtype=DTYPE)
    return x, x @ w_true + 0.1 * torch.randn(n, generator=g, dtype=DTYPE)


TRAIN = [_rows(4 + 3 * (t % 3), 100 + t) for t in range(12)]  # 4, 7, 10, 4, ... rows
VAL = [_rows(5 + k, 200 + k) for k in range(5)]  # 5, 6, 7, ... rows


class Recording(torch.optim.SGD):
    """SGD that keeps every hypergradient it applies (flattened)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.applied: list[torch.Tensor] = []

    def step(self, closure=None):
        grads = [p.grad.reshape(-1) for p in self.param_groups[0]["params"]]
        self.applied.append(torch.cat(grads).detach().clone())
        return super().step(closure)


def hand_online(every: int, steps: int, forward: bool, schedule: int | None = None):
    """RTHO / online truncated reverse on ridge by hand: ``w <- w - eta g``,
    ``Z <- (I - eta H) Z - d(eta g)/d(lambda)``, at each update ``Z^T v`` (Truncated: ``Z``
    restarts at 0 after each update), SGD on lambda. ``lambda = (log_l2, log_lr)`` with
    ``eta = exp(log_lr)``, or ``(log_l2, lrs)`` with ``eta = lrs[t]`` (learned schedule)."""
    l2 = torch.tensor([-1.0, -0.5, -2.0], dtype=DTYPE)
    eta_params = (
        torch.tensor([-1.5], dtype=DTYPE)
        if schedule is None
        else torch.linspace(0.3, 0.1, schedule, dtype=DTYPE)
    )
    m = D + len(eta_params)
    w, z = torch.zeros(D, dtype=DTYPE), torch.zeros(D, m, dtype=DTYPE)
    applied, records, k = [], [], 0
    for t in range(steps):
        x, y = TRAIN[t]
        lam = l2.exp()
        eta = eta_params[0].exp() if schedule is None else eta_params[t]
        g = x.T @ (x @ w - y) / len(x) + lam * w
        h = x.T @ x / len(x) + torch.diag(lam)
        b = torch.zeros(D, m, dtype=DTYPE)
        b[:, :D] = eta * torch.diag(lam * w)
        b[:, D if schedule is None else D + t] = eta * g if schedule is None else g
        ll_loss = 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam * w * w).sum()
        z = (torch.eye(D, dtype=DTYPE) - eta * h) @ z - b
        w = w - eta * g
        if (t + 1) % every == 0:
            xv, yv = VAL[k]
            v = xv.T @ (xv @ w - yv) / len(xv)
            hypergradient = z.T @ v
            applied.append(hypergradient)
            records.append((t + 1, k + 1, 0.5 * ((xv @ w - yv) ** 2).mean(), ll_loss))
            l2 = l2 - UL_LR * hypergradient[:D]
            eta_params = eta_params - UL_LR * hypergradient[D:]
            k += 1
            if not forward:
                z = torch.zeros_like(z)
    return applied, w, records


def library_online(every: int, steps: int, forward: bool, schedule: int | None = None):
    net, ul = Linear(D), Hypers(schedule)
    if schedule is None:
        ll = GradientDescent(online_ll, net, ul, lr=lambda u: u.log_lr.exp(), iters=1)
    else:
        ll = GradientDescent(online_ll, net, ul, lr=ul.lrs, iters=schedule)
    if forward:
        calculator = Forward(online_ul, ul, online_ll, net)
    else:
        calculator = Truncated(online_ul, ul, online_ll, net, truncate_iter=every)
    optimizer = Recording(ul.parameters(), UL_LR)
    records: list = []
    model = OnlineHypergradient(ll, calculator, optimizer, every).run(
        lambda t: TRAIN[t], lambda k: VAL[k], ll_steps=steps, log=records.append, progress=False
    )
    return optimizer.applied, model.w.detach(), records


@pytest.mark.parametrize("forward", [True, False], ids=["rtho", "truncated"])
def test_online_matches_the_hand_written_reference(forward):
    """10 LL steps, an update every 3 (the 10th step is taken, no update follows it), LL
    batches of 4, 7 and 10 rows in turn, UL batches of 5, 6, 7 rows, the LL step size
    ``exp(log_lr)`` computed from the UL model (used at its new value after each update):
    every applied hypergradient, every log record and the final LL weights."""
    want, w_want, records_want = hand_online(3, 10, forward)
    got, w_got, records = library_online(3, 10, forward)
    assert len(got) == len(want) == 3
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert float(b.abs().max()) > 1e-3  # not vacuous
        close([a], [b], f"update {k}")
    close([w_got], [w_want], "LL weights after the run")
    for record, (ll_step, ul_step, ul_loss, ll_loss) in zip(records, records_want, strict=True):
        assert (record["ll_step"], record["ul_step"]) == (ll_step, ul_step)
        assert math.isclose(record["ul_loss"], float(ul_loss), rel_tol=RTOL)
        assert math.isclose(record["ll_loss"], float(ll_loss), rel_tol=RTOL)


@pytest.mark.parametrize("forward", [True, False], ids=["rtho", "truncated"])
def test_online_learned_step_size_schedule_matches_the_hand_reference(forward):
    """A learned per-step schedule (12 entries, 9 online steps): step t uses entry t of the
    schedule's current value; RTHO's tangents reach every entry used so far, truncated
    reverse only those of the window."""
    want, w_want, _ = hand_online(3, 9, forward, schedule=12)
    got, w_got, _ = library_online(3, 9, forward, schedule=12)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        close([a], [b], f"update {k}")
    close([w_got], [w_want], "LL weights after the run")


def test_online_asks_for_each_ll_batch_once():
    """BUG: ``run`` called ``train(0)`` twice (once to start the LL, once for its first
    step): a batch function that reads the next batch of a loader (``lambda step:
    next(batches)``) lost a batch and fed every step the batch meant for the next one."""
    calls: list[int] = []

    def train(step):
        calls.append(step)
        return TRAIN[step]

    net, ul = Linear(D), Hypers()
    ll = GradientDescent(online_ll, net, ul, lr=lambda u: u.log_lr.exp(), iters=1)
    calculator = Forward(online_ul, ul, online_ll, net)
    runner = OnlineHypergradient(ll, calculator, torch.optim.SGD(ul.parameters(), lr=UL_LR), 3)
    runner.run(train, lambda k: VAL[k], ll_steps=6, progress=False)
    assert calls == list(range(6))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

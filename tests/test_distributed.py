"""Two gloo processes on loopback give the same UL step as one process."""

from __future__ import annotations

import os
import socket

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


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save({"meta": meta_step(), "hyper": hyper_step()}, f"{out}.{rank}")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    single = {"meta": meta_step(), "hyper": hyper_step()}
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for key in ("meta", "hyper"):
        for got in ranks:
            for a, b in zip(got[key], single[key], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
        for a, b in zip(ranks[0][key], ranks[1][key], strict=True):
            assert torch.equal(a, b)  # every process took the same step

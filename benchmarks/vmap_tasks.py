"""Does batching the tasks of a meta-batch with ``torch.func.vmap`` beat a loop over them?

The same MAML meta-gradient (the 4-conv network, 5-way 1-shot, 15 queries, 5 inner steps of
lr 0.1, as in the benchmark's meta problem) is computed two ways in bare ``torch.func``: one
task at a time in a Python loop, and all tasks at once with ``vmap`` over the task dimension.
The distance between the two meta-gradients is recorded (the loop is the reference: it equals
the benchmark floor's), then both are timed alternately (A B A B), and the medians and their
ratio are written to ``benchmarks/results/vmap_tasks.json``, which ``report.py`` puts on the
benchmarks page. Through batch normalization in training mode the vmapped second-order
gradient is not the loop's (functorch issue #534, still open), so ``agrees`` is recorded too.

    python benchmarks/vmap_tasks.py [--batches 4 16] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import problems as P
import torch
import torch.nn.functional as F
from argtypes import count
from common import git_revision
from torch.func import functional_call, grad, vmap

OUT = Path(__file__).resolve().parent / "results" / "vmap_tasks.json"
Params = dict[str, torch.Tensor]


def maml_task_loss(net: torch.nn.Module, m: P.Meta) -> Callable:
    """``(params, xs, ys, xq, yq) -> query loss after the inner steps`` for one task."""

    def support_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    def task_loss(params: Params, xs, ys, xq, yq) -> torch.Tensor:
        fast = params
        for _ in range(m.steps):
            g = grad(support_loss)(fast, xs, ys)
            fast = {k: v - m.lr * g[k] for k, v in fast.items()}
        return support_loss(fast, xq, yq)

    return task_loss


def looped(task_loss: Callable, params: Params, m: P.Meta) -> list[torch.Tensor]:
    total = None
    for i in range(m.batch):
        g = grad(task_loss)(params, m.xs[i], m.ys[i], m.xq[i], m.yq[i])
        total = g if total is None else {k: total[k] + g[k] for k in g}
    return [t / m.batch for t in total.values()]


def batched(task_loss: Callable, params: Params, m: P.Meta) -> list[torch.Tensor]:
    def mean_loss(p: Params) -> torch.Tensor:
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, m.xs, m.ys, m.xq, m.yq).mean()

    return list(grad(mean_loss)(params).values())


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Relative distance of two gradients, all tensors flattened into one vector."""
    flat_a, flat_b = (torch.cat([t.reshape(-1) for t in g]) for g in (a, b))
    return float((flat_a - flat_b).norm() / flat_a.norm())


def diagnosis() -> dict[str, float]:
    """Loop against vmap in float64 on two tasks: with batch norm and 1 inner step, without
    batch norm, and with no inner step (first order only)."""
    out = {}
    for name, steps, batch_norm in (
        ("float64, batch norm, 1 inner step", 1, True),
        ("float64, no batch norm, 1 inner step", 1, False),
        ("float64, batch norm, no inner step", 0, True),
    ):
        m = P.meta(2, steps=steps)
        m.xs, m.xq = m.xs.double(), m.xq.double()
        net = P.meta_network(m).double()
        if not batch_norm:
            for block in net.features.blocks:
                block[1] = torch.nn.Identity()
        params = {k: v.detach() for k, v in net.named_parameters()}
        task_loss = maml_task_loss(net, m)
        out[name] = distance(looped(task_loss, params, m), batched(task_loss, params, m))
    return out


def timed(fn: Callable, *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=count, nargs="+", default=[4, 16])
    parser.add_argument("--rounds", type=count, default=5)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--out", type=Path, default=OUT, help=f"results file (default {OUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for batch in args.batches:
        m = P.meta(batch)
        net = P.meta_network(m)
        params = {k: v.detach() for k, v in net.named_parameters()}
        task_loss = maml_task_loss(net, m)
        a, b = looped(task_loss, params, m), batched(task_loss, params, m)  # also warms up
        gap = distance(a, b)
        loop_s, vmap_s = [], []
        for _ in range(args.rounds):
            loop_s.append(timed(looped, task_loss, params, m))
            vmap_s.append(timed(batched, task_loss, params, m))
        row = {
            "batch": batch,
            "loop_ms": 1000 * statistics.median(loop_s),
            "vmap_ms": 1000 * statistics.median(vmap_s),
            "loop_range_ms": [1000 * min(loop_s), 1000 * max(loop_s)],
            "vmap_range_ms": [1000 * min(vmap_s), 1000 * max(vmap_s)],
            "relative_distance": gap,
            "agrees": gap < 1e-4,
        }
        row["vmap_over_loop"] = row["vmap_ms"] / row["loop_ms"]
        rows.append(row)
        print(
            f"batch {batch}: loop {row['loop_ms']:.0f} ms, vmap {row['vmap_ms']:.0f} ms, "
            f"vmap / loop = {row['vmap_over_loop']:.2f}; relative distance of the "
            f"meta-gradients {gap:.1e}"
        )
    checks = diagnosis()
    for name, value in checks.items():
        print(f"{name}: relative distance {value:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now().isoformat(timespec="seconds"),
                "command": "python benchmarks/vmap_tasks.py --batches "
                + " ".join(map(str, args.batches))
                + f" --rounds {args.rounds} --threads {args.threads}",
                "git": git_revision(),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "threads": args.threads,
                "rows": rows,
                "diagnosis": checks,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Why iMAML and first-order MAML fall short on few-shot Omniglot (issue 16): measurements.

Five subcommands, each writing one JSON file (``--out``) with every number and the command:

``train``: a short meta-training run of MAML, first-order MAML or iMAML on 5-way 1-shot
Omniglot with the 4-conv network (:class:`bilevel.models.FewShotNet`), written as a plain
functional loop (``torch.func.functional_call``) so that the variants under test (inner
steps, step sizes, a head zeroed for every task, the iMAML solver) are one flag each. Every
``--log-every`` meta-steps it records the norm of every meta-parameter tensor (conv weights,
batch-norm scales and shifts, head), the support loss before and after adaptation, the
pre-adaptation logit scale, the query loss and accuracy; every ``--cos-every`` meta-steps
the first-order MAML and MAML meta-gradients on the same batch (cosine and norm ratio per
layer); every ``--eval-every`` the meta-validation accuracy (the example's tasks: seed 1, 15
queries per class). ``--save`` keeps the final meta-parameters for ``imaml``.

``imaml``: on sampled meta-training tasks at given meta-parameters (``--checkpoint``, or the
initialization), run iMAML's inner loop (proximal gradient descent, as
``examples/omniglot.py --method imaml`` does, or the iMAML authors' released loop) in
float64, then compare meta-gradients: the library's ``Implicit`` (conjugate gradient as the
example runs it, checked equal to the library's own call), CG that goes on through
non-positive curvature (the iMAML paper's), MINRES, CG on the normal equations, a damped
solve, the iMAML authors' released operator ``(1 + d) I + H / (reg + 10)``, against the exact
solve of ``(H + reg I) q = g`` (MINRES to ``1e-10``, or a dense solve with ``--dense``), the
gradient of the procedure actually run (reverse mode through the inner loop) and MAML's.
Curvature: Lanczos on the support-loss Hessian ``H`` at the adapted weights (extreme
eigenvalues), from a random start and from ``g`` (the Krylov space CG sees), and for each
CG run the first iteration with ``p^T A p <= 0``.

``spikes``: over many tasks at a checkpoint, in float32 as meta-training computes it, the
norm of iMAML's meta-gradient from the library's CG, MINRES and truncated CG that returns its
smallest-residual iterate, against the query gradient (a CG step along a direction of tiny
positive curvature gives a meta-gradient thousands of times too large).

``curvature``: the smallest eigenvalue of the support Hessian at iMAML's adapted weights,
split into its Gauss-Newton part (positive semi-definite) and the rest, against the bound
that batch norm's scale invariance puts on it.

``check``: this script's MAML and first-order MAML meta-gradients against the library's
``Reverse`` and ``FirstOrder`` (float64).

Run (one thread; the data folder holds ``omniglot/``)::

    export BILEVEL_DATA=/path/to/data
    python benchmarks/omniglot_diagnosis.py train --method maml --meta-steps 300 \\
        --save runs/diagnosis/maml-h32.pt --out benchmarks/results/omniglot_diagnosis_maml.json
    python benchmarks/omniglot_diagnosis.py imaml --checkpoint runs/diagnosis/maml-h32.pt \\
        --tasks 16 --out benchmarks/results/omniglot_diagnosis_imaml.json
    python benchmarks/omniglot_diagnosis.py train --help

References: Finn, Abbeel & Levine (2017), "Model-Agnostic Meta-Learning for Fast Adaptation
of Deep Networks", ICML; Nichol, Achiam & Schulman (2018), "On First-Order Meta-Learning
Algorithms", arXiv:1803.02999; Rajeswaran, Finn, Kakade & Levine (2019), "Meta-Learning with
Implicit Gradients", NeurIPS; Kao, Chen & Tsai (2022), "MAML is a Noisy Contrastive Learner
in Classification", ICLR (zeroing the head); Paige & Saunders (1975) (MINRES); Lanczos (1950).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from argtypes import count, nonnegative, nonnegative_int, positive  # noqa: E402
from common import git_revision  # noqa: E402

from bilevel import BilevelProblem, checkpoint, linalg  # noqa: E402
from bilevel.data import Omniglot, TaskSampler  # noqa: E402
from bilevel.ll import GradientDescent  # noqa: E402
from bilevel.models import FewShotNet  # noqa: E402
from bilevel.ul import FirstOrder, Implicit, Reverse  # noqa: E402

VAL_SEED = 1  # the meta-validation tasks of examples/omniglot.py
Vec = list[torch.Tensor]


# ---- the network as a function of its parameters --------------------------------------------


class Net:
    """:class:`FewShotNet` called with explicit parameter lists, and short names for them."""

    def __init__(self, ways: int, hidden: int, dtype: torch.dtype, seed: int) -> None:
        torch.manual_seed(seed)
        self.module = FewShotNet(ways, hidden=hidden).to(dtype)
        self.names = [n for n, _ in self.module.named_parameters()]
        self.short = [short_name(n) for n in self.names]

    def init(self) -> Vec:
        """The module's initial parameters (copies)."""
        return [p.detach().clone() for p in self.module.parameters()]

    def logits(self, params: Vec, x: torch.Tensor) -> torch.Tensor:
        """The network's output with ``params``."""
        return functional_call(self.module, dict(zip(self.names, params, strict=True)), (x,))

    def loss(self, params: Vec, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy."""
        return F.cross_entropy(self.logits(params, x), y)


def short_name(name: str) -> str:
    """``features.blocks.2.1.weight`` -> ``bn3.w``; ``head.weight`` -> ``head.w``."""
    parts = name.split(".")
    kind = parts[-1][0]  # w or b
    if parts[0] == "head":
        return f"head.{kind}"
    block, layer = int(parts[2]) + 1, int(parts[3])
    return f"conv{block}.{kind}" if layer == 0 else f"bn{block}.{kind}"


def flat(v: Vec) -> torch.Tensor:
    """One vector from a list of tensors."""
    return torch.cat([t.reshape(-1) for t in v])


def unflat(x: torch.Tensor, like: Vec) -> Vec:
    """A flat vector back to tensors shaped like ``like``."""
    out, i = [], 0
    for t in like:
        out.append(x[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two flat vectors (0 when one is zero)."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a|| / ||b||``."""
    nb = float(b.norm())
    return float(a.norm()) / nb if nb > 0 else float("inf")


# ---- inner loops -----------------------------------------------------------------------------


def adapt(
    net: Net,
    theta: Vec,
    xs: torch.Tensor,
    ys: torch.Tensor,
    steps: int,
    lr: float,
    create_graph: bool,
    reg: float = 0.0,
    mask: list[bool] | None = None,
) -> tuple[Vec, list[float]]:
    """``steps`` of gradient descent on the support loss (+ ``reg/2 ||w - theta||^2``) from
    ``theta``; returns the weights and the support loss before each step (without the
    proximal term). Tensors with ``mask`` False are not adapted."""
    w = list(theta)
    losses = []
    for _ in range(steps):
        task = net.loss(w, xs, ys)
        losses.append(task.detach())
        total = task
        if reg:
            total = total + 0.5 * reg * sum(
                ((a - b) ** 2).sum() for a, b in zip(w, theta, strict=True)
            )
        grads = torch.autograd.grad(total, w, create_graph=create_graph)
        if mask is None:
            w = [a - lr * g for a, g in zip(w, grads, strict=True)]
        else:
            w = [a - lr * g if m else a for a, g, m in zip(w, grads, mask, strict=True)]
    return w, [float(v) for v in losses]


def leaves(v: Vec) -> Vec:
    """Detached copies that require grad."""
    return [t.detach().clone().requires_grad_() for t in v]


def imaml_inner(
    net: Net,
    theta: Vec,
    xs: torch.Tensor,
    ys: torch.Tensor,
    inner: str,
    steps: int,
    lr: float,
    reg: float,
    create_graph: bool,
) -> tuple[Vec, list[float]]:
    """iMAML's inner loop: ``"proximal"``, GD on ``L_s + reg/2 ||w - theta||^2`` (as
    ``examples/omniglot.py``), or ``"released"``, the iMAML authors' code: GD on ``L_s``
    alone, then one step of the proximal pull ``w - lr reg (w - theta)``."""
    if inner == "proximal":
        return adapt(net, theta, xs, ys, steps, lr, create_graph, reg=reg)
    w, losses = adapt(net, theta, xs, ys, steps, lr, create_graph)
    return [a - lr * reg * (a - t) for a, t in zip(w, theta, strict=True)], losses


def maml_gradient(
    net: Net, theta: Vec, task: dict, steps: int, lr: float, mask: list[bool] | None = None
) -> Vec:
    """MAML's meta-gradient of one task (reverse mode through ``steps`` steps)."""
    (xs, ys), (xq, yq) = task["train"], task["test"]
    th = leaves(theta)
    w, _ = adapt(net, th, xs, ys, steps, lr, create_graph=True, mask=mask)
    return list(torch.autograd.grad(net.loss(w, xq, yq), th))


def fomaml_gradient(
    net: Net, theta: Vec, task: dict, steps: int, lr: float, mask: list[bool] | None = None
) -> Vec:
    """First-order MAML's meta-gradient of one task: the query gradient at the adapted
    weights."""
    (xs, ys), (xq, yq) = task["train"], task["test"]
    w, _ = adapt(net, leaves(theta), xs, ys, steps, lr, create_graph=False, mask=mask)
    w = leaves(w)
    return list(torch.autograd.grad(net.loss(w, xq, yq), w))


# ---- linear algebra on flat vectors ----------------------------------------------------------


def plain_cg(matvec, b: torch.Tensor, iters: int) -> tuple[torch.Tensor, int | None, list]:
    """Conjugate gradient that goes on through non-positive curvature (the iMAML paper's
    ``cg_solve``): ``(x, first iteration with p^T A p <= 0 or None, [p^T A p / p^T p])``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    first_bad, curv = None, []
    for i in range(iters):
        ap = matvec(p)
        pap = p @ ap
        curv.append(float(pap / (p @ p)))
        if pap <= 0 and first_bad is None:
            first_bad = i
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, first_bad, curv


def cg_best_residual(matvec, b: torch.Tensor, iters: int) -> tuple[torch.Tensor, int]:
    """Truncated CG (stops at ``p^T A p <= 0``, as :func:`bilevel.linalg.cg`) that returns
    the iterate with the smallest residual ``||b - A x||`` it has seen, ``x = 0`` included:
    on an indefinite ``A`` a step along a direction of tiny positive curvature sends the
    last iterate (and its residual) to a huge value. Returns ``(x, index of the iterate)``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    best, best_rr, best_i = x, rr, 0
    for i in range(iters):
        ap = matvec(p)
        pap = p @ ap
        if not pap > 0:
            break
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        if rr_new < best_rr:
            best, best_rr, best_i = x, rr_new, i + 1
        p = r + (rr_new / rr) * p
        rr = rr_new
    return best, best_i


def lanczos_extremes(matvec, start: torch.Tensor, steps: int) -> tuple[float, float, list]:
    """Extreme Ritz values of a symmetric operator after ``steps`` Lanczos steps with full
    reorthogonalization (Lanczos 1950): ``(smallest, largest, all Ritz values)``."""
    q = start / start.norm()
    basis = [q]
    alphas, betas = [], []
    for j in range(steps):
        w = matvec(basis[-1])
        alpha = basis[-1] @ w
        w = w - alpha * basis[-1] - (betas[-1] * basis[-2] if j else 0)
        stack = torch.stack(basis)
        for _ in range(2):
            w = w - stack.T @ (stack @ w)
        beta = w.norm()
        alphas.append(alpha)
        if beta < 1e-12 * abs(float(alpha)) or j == steps - 1:
            break
        betas.append(beta)
        basis.append(w / beta)
    t = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas[: len(alphas) - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(t)
    return float(ritz[0]), float(ritz[-1]), [float(v) for v in ritz]


# ---- iMAML diagnosis -------------------------------------------------------------------------


def library_imaml(
    net: Net, theta: Vec, task: dict, reg: float, steps: int, lr: float, method: str, k: int
) -> tuple[Vec, dict]:
    """The library's iMAML meta-gradient of one task, as ``examples/omniglot.py --method
    imaml`` builds it (proximal GD, ``Implicit(method=..., on_divergence="warn")``)."""
    module = FewShotNet(
        net.module.head.out_features, hidden=net.module.features.blocks[0][0].out_channels
    )
    module = module.to(theta[0].dtype)
    with torch.no_grad():
        for p, t in zip(module.parameters(), theta, strict=True):
            p.copy_(t)

    def ll_objective(state):
        loss = F.cross_entropy(state["ll_model"](state["data"]), state["target"])
        pairs = zip(state["ll_model"].parameters(), state["ul_model"].parameters(), strict=True)
        return loss + 0.5 * reg * sum(((w - t) ** 2).sum() for w, t in pairs)

    def ul_objective(state):
        return F.cross_entropy(state["ll_model"](state["data"]), state["target"])

    ll = GradientDescent(ll_objective, module, module, lr, steps, on_growth="ignore")
    ul = Implicit(
        ul_objective,
        module,
        ll_objective,
        module,
        ll_learning_rate=lr,
        k=k,
        tolerance=1e-6,
        method=method,
        on_divergence="warn",
        stationarity_warning=None,
    )
    problem = BilevelProblem(ll, ul)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = problem.hypergradient(task["train"], task["test"])
    return grads, dict(ul.diagnostics)


def imaml_task(net: Net, theta: Vec, task: dict, args: argparse.Namespace, reg: float) -> dict:
    """Every meta-gradient and curvature statistic of one task at one ``reg``."""
    (xs, ys), (xq, yq) = task["train"], task["test"]
    th = leaves(theta)
    started = time.perf_counter()
    w_graph, ll_losses = imaml_inner(
        net, th, xs, ys, args.inner, args.inner_steps, args.inner_lr, reg, create_graph=True
    )
    # the gradient of the procedure actually run (reverse mode through the inner loop)
    unrolled = flat(torch.autograd.grad(net.loss(w_graph, xq, yq), th))
    w = leaves(w_graph)
    g = flat(torch.autograd.grad(net.loss(w, xq, yq), w))
    support = net.loss(w, xs, ys)
    grad_s = torch.autograd.grad(support, w, create_graph=True)
    flat_gs = flat(grad_s)
    prox_grad = flat_gs.detach() + reg * flat(
        [a.detach() - b for a, b in zip(w, theta, strict=True)]
    )
    th0 = leaves(theta)
    start_grad = flat(torch.autograd.grad(net.loss(th0, xs, ys), th0))
    hvps = [0]

    def hess(v: torch.Tensor) -> torch.Tensor:  # H v, the support loss's Hessian
        hvps[0] += 1
        out = torch.autograd.grad(grad_s, w, unflat(v, w), retain_graph=True)
        return flat(out)

    def a_op(v: torch.Tensor) -> torch.Tensor:  # (H + reg I) v
        return hess(v) + reg * v

    def a_list(v: Vec) -> Vec:
        return unflat(a_op(flat(v)), w)

    gl = unflat(g, w)
    row: dict[str, Any] = {
        "reg": reg,
        "ll_loss_first": ll_losses[0],
        "ll_loss_last": ll_losses[-1],
        "support_loss_adapted": float(support.detach()),
        "query_loss_adapted": float(net.loss(w, xq, yq)),
        "ll_grad_ratio": float(prox_grad.norm() / start_grad.norm()),
        "g_norm": float(g.norm()),
    }
    # the exact solve: MINRES to 1e-10 (float64), or dense
    exact_q, info = linalg.minres(a_list, gl, args.exact_iters, 1e-10)
    exact = reg * flat(exact_q)
    true_residual = float((a_op(flat(exact_q)) - g).norm() / g.norm())
    row["exact"] = {
        "minres_iterations": info.iterations,
        "relative_residual": true_residual,
        "converged": info.converged,
    }
    rand = torch.randn(g.numel(), dtype=g.dtype, generator=torch.Generator().manual_seed(0))
    lo, hi, _ = lanczos_extremes(hess, rand, args.lanczos_steps)
    lo_g, hi_g, ritz_g = lanczos_extremes(hess, g, min(args.lanczos_steps, 20))
    row["curvature"] = {
        "H_lambda_min": lo,
        "H_lambda_max": hi,
        "A_lambda_min": lo + reg,
        "A_indefinite": lo + reg < 0,
        "H_lambda_min_krylov_g_20": lo_g,
        "H_lambda_max_krylov_g_20": hi_g,
        "A_negative_ritz_krylov_g_20": sum(v + reg < 0 for v in ritz_g),
    }
    if args.dense:
        n = g.numel()
        eye = torch.eye(n, dtype=g.dtype)
        dense = torch.stack([hess(eye[i]) for i in range(n)])
        dense = 0.5 * (dense + dense.T)
        evals, evecs = torch.linalg.eigh(dense)
        coeff = evecs.T @ g
        neg = evals + reg < 0
        dense_solution = reg * (evecs @ (coeff / (evals + reg)))
        row["dense"] = {
            "n": n,
            "H_lambda_min": float(evals[0]),
            "H_lambda_max": float(evals[-1]),
            "A_negative_eigenvalues": int(neg.sum()),
            "A_near_singular_1e-2": int(((evals + reg).abs() < 1e-2 * reg).sum()),
            "g_fraction_in_negative_A": float(coeff[neg].norm() / g.norm()),
            "cos_dense_minres": cosine(dense_solution, exact),
            "rel_diff_dense_minres": ratio(dense_solution - exact, dense_solution),
        }
        # the solve restricted to the positive part of A (what a Newton step with negative
        # curvature dropped would give), for comparison
        pos = reg * (evecs[:, ~neg] @ (coeff[~neg] / (evals[~neg] + reg)))
        row["dense"]["cos_positive_part_exact"] = cosine(pos, exact)
        row["dense"]["cos_positive_part_unrolled"] = cosine(pos, unrolled)
    estimates: dict[str, torch.Tensor] = {}
    breakdown: dict[str, Any] = {}
    for k in args.cg_steps:
        q, cg_info = linalg.cg(a_list, gl, k, 1e-6)
        estimates[f"library_cg{k}"] = reg * flat(q)
        breakdown[f"library_cg{k}"] = {
            "iterations": cg_info.iterations,
            "diverged": cg_info.diverged,
        }
        x, first_bad, curv = plain_cg(a_op, g, k)
        estimates[f"paper_cg{k}"] = reg * x
        x, best_i = cg_best_residual(a_op, g, k)
        estimates[f"cg_best_residual{k}"] = reg * x
        breakdown[f"cg_best_residual{k}"] = {"iterate": best_i}
        breakdown[f"paper_cg{k}"] = {"first_nonpositive": first_bad, "pAp_over_pp": curv}
        q, _ = linalg.minres(a_list, gl, k, 1e-6)
        estimates[f"minres{k}"] = reg * flat(q)
        q, _ = linalg.normal_cg(linalg.Operator(a_list, symmetric=True), gl, k, 1e-6)
        estimates[f"normal_cg{k}"] = reg * flat(q)
    # damped solves: (H + (reg + delta) I) x = g, scaled as reg x, the least delta that makes
    # A positive definite on what Lanczos saw, and the authors' released operator
    k = args.cg_steps[0]
    shift = max(0.0, -(lo + reg)) * 1.1 + 1e-3 * reg
    x, bad, _ = plain_cg(lambda v: a_op(v) + shift * v, g, k)
    estimates[f"damped_cg{k}"] = reg * x
    breakdown[f"damped_cg{k}"] = {"shift": shift, "first_nonpositive": bad}
    damping, lam_damping = 1.0, 10.0
    x, bad, _ = plain_cg(lambda v: (1 + damping) * v + hess(v) / (reg + lam_damping), g, k)
    estimates[f"released_cg{k}"] = x
    breakdown[f"released_cg{k}"] = {"first_nonpositive": bad}
    estimates["first_order"] = g  # no solve at all: (I + H/reg)^-1 ~ I
    # the library's own call: it must equal library_cg (same operator, same CG)
    if args.inner == "proximal":
        lib, lib_diag = library_imaml(
            net, theta, task, reg, args.inner_steps, args.inner_lr, "cg", args.cg_steps[0]
        )
        lib = flat(lib)
        row["library_call_vs_library_cg_rel_diff"] = ratio(
            lib - estimates[f"library_cg{args.cg_steps[0]}"], lib
        )
        row["library_call_cg_diverged"] = bool(lib_diag.get("diverged"))
    maml = flat(maml_gradient(net, theta, task, 1, args.maml_lr))
    refs = {"exact": exact, "unrolled": unrolled, "maml": maml}
    row["estimates"] = {
        name: {
            "norm": float(e.norm()),
            **{f"cos_{r}": cosine(e, ref) for r, ref in refs.items()},
            "rel_err_exact": ratio(e - exact, exact),
        }
        for name, e in estimates.items()
    }
    row["references"] = {
        "exact_norm": float(exact.norm()),
        "unrolled_norm": float(unrolled.norm()),
        "maml_norm": float(maml.norm()),
        "cos_exact_unrolled": cosine(exact, unrolled),
        "cos_exact_maml": cosine(exact, maml),
        "cos_unrolled_maml": cosine(unrolled, maml),
    }
    row["solvers"] = breakdown
    row["hvps"] = hvps[0]
    row["seconds"] = round(time.perf_counter() - started, 2)
    row["_vectors"] = {**estimates, **refs}
    return row


def summarize_imaml(rows: list[dict]) -> dict:
    """Medians over tasks, counts of indefinite systems and CG breakdowns, and cosines of the
    meta-batch means (the meta-gradient a meta-step uses)."""
    out: dict[str, Any] = {"tasks": len(rows)}
    if not rows:
        return out

    def med(values: list[float]) -> float:
        values = sorted(values)
        n = len(values)
        return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])

    out["A_indefinite_tasks"] = sum(r["curvature"]["A_indefinite"] for r in rows)
    out["H_lambda_min_median"] = med([r["curvature"]["H_lambda_min"] for r in rows])
    out["H_lambda_min_min"] = min(r["curvature"]["H_lambda_min"] for r in rows)
    out["H_lambda_max_median"] = med([r["curvature"]["H_lambda_max"] for r in rows])
    out["ll_grad_ratio_median"] = med([r["ll_grad_ratio"] for r in rows])
    out["exact_converged_tasks"] = sum(r["exact"]["converged"] for r in rows)
    names = list(rows[0]["estimates"])
    out["median_per_task"] = {
        n: {
            key: med([r["estimates"][n][key] for r in rows])
            for key in ("cos_exact", "cos_unrolled", "cos_maml", "rel_err_exact")
        }
        for n in names
    }
    solvers = rows[0]["solvers"]
    for name in solvers:
        if name.startswith("library_cg"):
            its = [r["solvers"][name]["iterations"] for r in rows]
            out[f"{name}_diverged_tasks"] = sum(r["solvers"][name]["diverged"] for r in rows)
            out[f"{name}_iterations_histogram"] = {str(i): its.count(i) for i in sorted(set(its))}
        if name.startswith("paper_cg"):
            firsts = [r["solvers"][name]["first_nonpositive"] for r in rows]
            out[f"{name}_first_nonpositive_histogram"] = {
                str(i): firsts.count(i) for i in sorted(set(firsts), key=lambda v: (v is None, v))
            }
    means = {n: torch.stack([r["_vectors"][n] for r in rows]).mean(0) for n in rows[0]["_vectors"]}
    out["batch_mean"] = {
        n: {
            "cos_exact": cosine(means[n], means["exact"]),
            "cos_unrolled": cosine(means[n], means["unrolled"]),
            "cos_maml": cosine(means[n], means["maml"]),
            "norm": float(means[n].norm()),
        }
        for n in names
    }
    ref = {"exact", "unrolled", "maml"}
    out["batch_mean_references"] = {
        f"cos_{a}_{b}": cosine(means[a], means[b]) for a in ref for b in ref if a < b
    }
    return out


def run_imaml(args: argparse.Namespace) -> dict:
    """The ``imaml`` subcommand."""
    dtype = torch.float64
    if args.checkpoint:
        saved = load_params(args.checkpoint)
        hidden, ways = saved["hidden"], saved["ways"]
        net = Net(ways, hidden, dtype, seed=args.seed)
        theta = [saved["params"][n].to(dtype) for n in net.names]
        origin = {"checkpoint": str(args.checkpoint), "trained": saved.get("settings")}
    else:
        hidden, ways = args.hidden, args.ways
        net = Net(ways, hidden, dtype, seed=args.seed)
        theta = net.init()
        origin = {"checkpoint": None, "init_seed": args.seed}
    omniglot = Omniglot(args.data_root, cache_dir=args.cache_dir, progress=False)
    sampler = TaskSampler(omniglot.split("train"), ways, args.shots, args.query, seed=args.seed)
    regs = args.reg
    result: dict[str, Any] = {"origin": origin, "hidden": hidden, "ways": ways, "per_reg": {}}
    deadline = time.perf_counter() + 60 * args.max_minutes
    for reg in regs:
        rows = []
        for i in range(args.tasks):
            if time.perf_counter() > deadline:
                break
            task = sampler.task(args.first_task + i)
            task = {k: (x.to(dtype), y) for k, (x, y) in task.items()}
            row = imaml_task(net, theta, task, args, reg)
            row["task"] = args.first_task + i
            rows.append(row)
            est = row["estimates"]
            k = args.cg_steps[0]
            print(
                f"reg {reg:g} task {row['task']}: lambda_min(H) "
                f"{row['curvature']['H_lambda_min']:.3g}"
                f" max {row['curvature']['H_lambda_max']:.3g}; library CG iterations "
                f"{row['solvers'][f'library_cg{k}']['iterations']}; cos to exact: library "
                f"{est[f'library_cg{k}']['cos_exact']:.3f} paper "
                f"{est[f'paper_cg{k}']['cos_exact']:.3f}"
                f" minres {est[f'minres{k}']['cos_exact']:.3f}; exact vs unrolled "
                f"{row['references']['cos_exact_unrolled']:.3f}, vs maml "
                f"{row['references']['cos_exact_maml']:.3f} ({row['seconds']} s)",
                flush=True,
            )
        summary = summarize_imaml(rows)
        for row in rows:
            row.pop("_vectors")
        result["per_reg"][str(reg)] = {"summary": summary, "tasks": rows}
    return result


def run_curvature(args: argparse.Namespace) -> dict:
    """The ``curvature`` subcommand: the support-loss Hessian ``H`` at iMAML's adapted weights
    against what batch normalization forces on it. A convolution followed by batch norm is
    scale invariant, ``L(c W) = L(W)``, hence ``H (W, 0) = (-grad_W L, 0)`` and ``W . grad_W L
    = 0``: on the plane of ``W`` and ``grad_W L`` the Rayleigh quotients of ``H`` form the
    matrix ``[[0, -s], [-s, rho]]`` with ``s = |grad_W L| / |W|`` and ``rho`` the curvature
    along the gradient, whose smallest eigenvalue ``rho/2 - sqrt(rho^2/4 + s^2)`` bounds
    ``lambda_min(H)`` from above. At an iMAML solution ``grad L = -reg (w - theta)`` is not
    zero, so ``H + reg I`` is indefinite as soon as that bound is below ``-reg``."""
    dtype = torch.float64
    saved = load_params(args.checkpoint) if args.checkpoint else None
    hidden = saved["hidden"] if saved else args.hidden
    net = Net(args.ways, hidden, dtype, seed=args.seed)
    theta = [saved["params"][n].to(dtype) for n in net.names] if saved else net.init()
    omniglot = Omniglot(args.data_root, cache_dir=args.cache_dir, progress=False)
    sampler = TaskSampler(
        omniglot.split("train"), args.ways, args.shots, args.query, seed=args.seed
    )
    convs = [i for i, n in enumerate(net.short) if n.startswith("conv")]
    rows = []
    for i in range(args.tasks):
        task = sampler.task(args.first_task + i)
        xs, ys = task["train"][0].to(dtype), task["train"][1]
        w, _ = adapt(net, leaves(theta), xs, ys, args.inner_steps, args.inner_lr, False, args.reg)
        w = leaves(w)
        grads = torch.autograd.grad(net.loss(w, xs, ys), w, create_graph=True)

        def hess(v: Vec, grads=grads, w=w) -> Vec:
            return list(torch.autograd.grad(grads, w, v, retain_graph=True))

        layers = {}
        for j in convs:
            gl = grads[j].detach()
            radial = [w[j].detach() if k == j else torch.zeros_like(t) for k, t in enumerate(w)]
            hv = hess(radial)
            identity = float(
                (
                    flat(hv)
                    + flat([gl if k == j else torch.zeros_like(t) for k, t in enumerate(w)])
                ).norm()
                / gl.norm()
            )
            along = [gl if k == j else torch.zeros_like(t) for k, t in enumerate(w)]
            rho = float(flat(hess(along)) @ flat(along) / gl.norm() ** 2)
            slope = float(gl.norm() / w[j].detach().norm())
            bound = rho / 2 - math.sqrt(rho**2 / 4 + slope**2)
            layers[net.short[j]] = {
                "grad_over_weight": slope,
                "rho": rho,
                "bound_on_lambda_min": bound,
                "identity_rel_err": identity,
            }
        start = torch.randn(
            sum(t.numel() for t in w), dtype=dtype, generator=torch.Generator().manual_seed(0)
        )
        lo, hi, _ = lanczos_extremes(lambda v, w=w: flat(hess(unflat(v, w))), start, 60)
        # the Gauss-Newton part G = J^T (d2 loss / d logits2) J is positive semi-definite; the
        # rest, R = H - G = sum (p - y)_c d2 z_c / dw2 / n, is where negative curvature lives
        ggn = gauss_newton(net, [t.detach() for t in w], xs, ys)
        g_lo, _, _ = lanczos_extremes(lambda v, w=w, ggn=ggn: flat(ggn(unflat(v, w))), start, 30)
        r_lo, _, _ = lanczos_extremes(
            lambda v, w=w, ggn=ggn: flat(hess(unflat(v, w))) - flat(ggn(unflat(v, w))), start, 60
        )
        with torch.no_grad():
            prob = F.softmax(net.logits(w, xs), -1)
            residual = float((prob - F.one_hot(ys, args.ways)).norm() / math.sqrt(len(ys)))
        rows.append(
            {
                "task": args.first_task + i,
                "H_lambda_min": lo,
                "H_lambda_max": hi,
                "gauss_newton_lambda_min": g_lo,
                "residual_part_lambda_min": r_lo,
                "rms_softmax_residual": residual,
                "tightest_bn_bound": min(v["bound_on_lambda_min"] for v in layers.values()),
                "layers": layers,
            }
        )
        print(
            f"task {rows[-1]['task']}: lambda_min(H) {lo:.3g}, batch-norm bound "
            f"{rows[-1]['tightest_bn_bound']:.3g}, lambda_max {hi:.3g}; lambda_min of the "
            f"Gauss-Newton part {g_lo:.3g}, of the rest {r_lo:.3g}",
            flush=True,
        )
    return {"tasks": rows}


def gauss_newton(net: Net, w: Vec, x: torch.Tensor, y: torch.Tensor):
    """``v -> G v`` with ``G = J^T (d2 loss / d logits2) J`` the generalized Gauss-Newton
    matrix of the mean cross-entropy at ``w`` (Schraudolph 2002), by one forward-mode and
    one reverse-mode product."""

    def logits(*params: torch.Tensor) -> torch.Tensor:
        return net.logits(list(params), x)

    def product(v: Vec) -> Vec:
        z, jv = torch.func.jvp(logits, tuple(w), tuple(v))
        p = F.softmax(z.detach(), -1)
        hz = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / len(y)
        _, vjp = torch.func.vjp(logits, *w)
        return list(vjp(hz))

    return product


def run_spikes(args: argparse.Namespace) -> dict:
    """The ``spikes`` subcommand: the size of iMAML's meta-gradient over many tasks, as
    meta-training computes it (float32, the library's CG), against the query gradient."""
    dtype = torch.float64 if args.float64 else torch.float32
    saved = load_params(args.checkpoint) if args.checkpoint else None
    hidden = saved["hidden"] if saved else args.hidden
    net = Net(args.ways, hidden, dtype, seed=args.seed)
    theta = [saved["params"][n].to(dtype) for n in net.names] if saved else net.init()
    omniglot = Omniglot(args.data_root, cache_dir=args.cache_dir, progress=False)
    sampler = TaskSampler(
        omniglot.split("train"), args.ways, args.shots, args.query, seed=args.seed
    )
    rows = []
    for i in range(args.tasks):
        task = sampler.task(args.first_task + i)
        (xs, ys), (xq, yq) = [(x.to(dtype), y) for x, y in (task["train"], task["test"])]
        th = leaves(theta)
        w, _ = adapt(net, th, xs, ys, args.inner_steps, args.inner_lr, False, reg=args.reg)
        w = leaves(w)
        g = flat(torch.autograd.grad(net.loss(w, xq, yq), w))
        grad_s = torch.autograd.grad(net.loss(w, xs, ys), w, create_graph=True)

        def a_op(v: torch.Tensor, grad_s=grad_s, w=w) -> torch.Tensor:
            hv = torch.autograd.grad(grad_s, w, unflat(v, w), retain_graph=True)
            return flat(hv) + args.reg * v

        q, info = linalg.cg(
            lambda v, w=w, a_op=a_op: unflat(a_op(flat(v)), w), unflat(g, w), args.cg, 1e-6
        )
        _, first_bad, curv = plain_cg(a_op, g, args.cg)
        m, _ = linalg.minres(
            lambda v, w=w, a_op=a_op: unflat(a_op(flat(v)), w), unflat(g, w), args.cg, 1e-6
        )
        best, _ = cg_best_residual(a_op, g, args.cg)
        lib = args.reg * flat(q)
        rows.append(
            {
                "task": args.first_task + i,
                "query_grad_norm": float(g.norm()),
                "library_cg_norm_ratio": ratio(lib, g),
                "minres_norm_ratio": ratio(args.reg * flat(m), g),
                "cg_best_residual_norm_ratio": ratio(args.reg * best, g),
                "library_cg_iterations": info.iterations,
                "library_cg_broke_down": info.diverged,
                "pAp_over_pp": curv,
                "smallest_positive_curvature_before_breakdown": min(
                    [c for c in curv[: first_bad if first_bad is not None else len(curv)]],
                    default=None,
                ),
            }
        )
    ratios = sorted(r["library_cg_norm_ratio"] for r in rows)
    summary = {
        "tasks": len(rows),
        "broke_down": sum(r["library_cg_broke_down"] for r in rows),
        "library_cg_norm_ratio_median": ratios[len(ratios) // 2] if ratios else None,
        "library_cg_norm_ratio_max": ratios[-1] if ratios else None,
        "library_cg_norm_ratio_over_10": sum(v > 10 for v in ratios),
        "library_cg_norm_ratio_over_100": sum(v > 100 for v in ratios),
        "minres_norm_ratio_max": max((r["minres_norm_ratio"] for r in rows), default=None),
        "cg_best_residual_norm_ratio_max": max(
            (r["cg_best_residual_norm_ratio"] for r in rows), default=None
        ),
    }
    print(summary)
    return {"summary": summary, "tasks": rows}


# ---- meta-training ---------------------------------------------------------------------------


def task_step(
    net: Net, theta: Vec, task: dict, args: argparse.Namespace
) -> tuple[Vec, dict[str, float]]:
    """One task's meta-gradient for ``args.method`` and its losses."""
    (xs, ys), (xq, yq) = task["train"], task["test"]
    th = leaves(theta)
    extra: dict[str, float] = {}
    if args.method == "imaml" and args.solver == "unrolled":  # reverse mode through the loop
        w, losses = imaml_inner(
            net, th, xs, ys, args.imaml_inner, args.inner_steps, args.inner_lr, args.reg, True
        )
        logits = net.logits(w, xq)
        query = F.cross_entropy(logits, yq)
        grads = list(torch.autograd.grad(query, th))
        extra["meta_grad_norm"] = float(flat(grads).norm())
    elif args.method == "imaml":
        w, losses = imaml_inner(
            net, th, xs, ys, args.imaml_inner, args.inner_steps, args.inner_lr, args.reg, False
        )
        w = leaves(w)
        query = net.loss(w, xq, yq)
        g = flat(torch.autograd.grad(query, w))
        support = net.loss(w, xs, ys)
        grad_s = torch.autograd.grad(support, w, create_graph=True)
        prox = flat(grad_s).detach() + args.reg * flat(
            [a.detach() - b for a, b in zip(w, theta, strict=True)]
        )
        th0 = leaves(theta)
        first = flat(torch.autograd.grad(net.loss(th0, xs, ys), th0))
        extra["ll_grad_ratio"] = float(prox.norm() / first.norm())

        def hess(v: torch.Tensor) -> torch.Tensor:
            return flat(torch.autograd.grad(grad_s, w, unflat(v, w), retain_graph=True))

        def a_op(v: torch.Tensor) -> torch.Tensor:
            return hess(v) + (args.reg + args.damping) * v

        scale = args.reg
        if args.solver == "library_cg":
            q, info = linalg.cg(lambda v: unflat(a_op(flat(v)), w), unflat(g, w), args.cg, 1e-6)
            x = flat(q)
            extra["cg_broke_down"] = float(info.diverged)
            extra["cg_iterations"] = float(info.iterations)
        elif args.solver == "minres":
            q, _ = linalg.minres(lambda v: unflat(a_op(flat(v)), w), unflat(g, w), args.cg, 1e-6)
            x = flat(q)
        elif args.solver == "released_cg":  # (1 + 1) I + H / (reg + 10), no rescaling
            x, _, _ = plain_cg(lambda v: 2.0 * v + hess(v) / (args.reg + 10.0), g, args.cg)
            scale = 1.0
        elif args.solver == "cg_best_residual":
            x, _ = cg_best_residual(a_op, g, args.cg)
        elif args.solver == "none":  # first-order iMAML: (I + H/reg)^-1 ~ I
            x, scale = g, 1.0
        else:
            x, bad, _ = plain_cg(a_op, g, args.cg)
            extra["cg_broke_down"] = float(bad is not None)
        grads = unflat(scale * x, w)
        extra["meta_grad_norm"] = float((scale * x).norm())
        extra["query_grad_norm"] = float(g.norm())
        logits = net.logits(w, xq)
    else:
        create = args.method == "maml"
        w, losses = adapt(
            net, th, xs, ys, args.inner_steps, args.inner_lr, create_graph=create, mask=args.mask
        )
        if not create:
            w = leaves(w)
        logits = net.logits(w, xq)
        query = F.cross_entropy(logits, yq)
        grads = list(torch.autograd.grad(query, th if create else w))
    with torch.no_grad():
        pre = net.logits(theta, xs)
        stats = {
            "support_pre": losses[0],
            "support_post": float(net.loss([t.detach() for t in w], xs, ys)),
            "query": float(query),
            "accuracy": float((logits.argmax(-1) == yq).float().mean()),
            "pre_logit_std": float(pre.std()),
            **extra,
        }
    return [g.detach() for g in grads], stats


def evaluate(net: Net, theta: Vec, sampler: TaskSampler, tasks: int, args) -> tuple[float, float]:
    """Mean query accuracy (and its 95% half-width) after adaptation, over ``tasks`` tasks
    (iMAML adapts with its proximal objective, as the example does)."""
    accs = []
    for i in range(tasks):
        task = sampler.task(i)
        (xs, ys), (xq, yq) = task["train"], task["test"]
        if args.method == "imaml" and args.imaml_inner == "released":
            # the iMAML release's evaluation (measure_accuracy.py): GD on the task loss alone
            w, _ = adapt(net, leaves(theta), xs, ys, args.inner_steps, args.inner_lr, False)
        elif args.method == "imaml":
            w, _ = imaml_inner(
                net,
                leaves(theta),
                xs,
                ys,
                args.imaml_inner,
                args.inner_steps,
                args.inner_lr,
                args.reg,
                False,
            )
        else:
            w, _ = adapt(
                net, leaves(theta), xs, ys, args.inner_steps, args.inner_lr, False, 0.0, args.mask
            )
        with torch.no_grad():
            accs.append(float((net.logits(w, xq).argmax(-1) == yq).float().mean()))
    acc = torch.tensor(accs, dtype=torch.float64)
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(len(accs)))


def gradient_cosines(net: Net, theta: Vec, batch: list[dict], args) -> dict:
    """First-order MAML's and MAML's meta-gradients on the same tasks: cosine and norm ratio
    per parameter tensor and overall (batch means)."""
    steps, lr, mask = args.inner_steps, args.inner_lr, args.mask
    fo = [fomaml_gradient(net, theta, t, steps, lr, mask) for t in batch]
    so = [maml_gradient(net, theta, t, steps, lr, mask) for t in batch]
    fo = [torch.stack(parts).mean(0) for parts in zip(*fo, strict=True)]
    so = [torch.stack(parts).mean(0) for parts in zip(*so, strict=True)]
    per = {
        name: {"cos": cosine(a.flatten(), b.flatten()), "norm_fo_over_maml": ratio(a, b)}
        for name, a, b in zip(net.short, fo, so, strict=True)
    }
    return {
        "all": {"cos": cosine(flat(fo), flat(so)), "norm_fo_over_maml": ratio(flat(fo), flat(so))},
        **per,
        "inner_lr_times_support_hessian": [
            support_curvature(net, theta, t, mask, lr) for t in batch[: args.curvature_tasks]
        ],
    }


def support_curvature(
    net: Net, theta: Vec, task: dict, mask: list[bool] | None, lr: float, steps: int = 20
) -> dict[str, float]:
    """``lr`` times the extreme eigenvalues of the support loss's Hessian at ``theta`` (over
    the tensors the inner loop adapts; 20 Lanczos steps): one inner step multiplies the
    meta-gradient by ``I - lr H``, which first-order MAML takes as ``I``."""
    xs, ys = task["train"]
    th = leaves(theta)
    keep = [i for i in range(len(th)) if mask is None or mask[i]]
    grads = torch.autograd.grad(net.loss(th, xs, ys), [th[i] for i in keep], create_graph=True)
    like = [th[i] for i in keep]

    def hess(v: torch.Tensor) -> torch.Tensor:
        return flat(torch.autograd.grad(grads, like, unflat(v, like), retain_graph=True))

    start = torch.randn(sum(t.numel() for t in like), generator=torch.Generator().manual_seed(0))
    lo, hi, _ = lanczos_extremes(hess, start.to(like[0].dtype), steps)
    return {"min": lr * lo, "max": lr * hi}


def run_train(args: argparse.Namespace) -> dict:
    """The ``train`` subcommand."""
    torch.set_num_threads(args.threads)
    net = Net(args.ways, args.hidden, torch.float32, seed=args.seed)
    theta = net.init()
    learned = list(range(len(theta)))
    if args.zero_head:  # every task starts its head at zero; the head is not meta-learned
        for i, name in enumerate(net.short):
            if name.startswith("head."):
                theta[i].zero_()
        learned = [i for i, n in enumerate(net.short) if not n.startswith("head.")]
    if args.bn_scale == "fixed":  # batch norm without a scale (Finn et al.'s code: scale=False)
        learned = [
            i for i in learned if not net.short[i].endswith(".w") or "bn" not in net.short[i]
        ]
    adapted = {"all": lambda n: True, "no-bn": lambda n: not n.startswith("bn")}[args.inner_params]
    args.mask = [adapted(n) and i in learned for i, n in enumerate(net.short)]
    if args.zero_head:  # the zero head is adapted in the inner loop, not meta-learned
        args.mask = [m or n.startswith("head.") for m, n in zip(args.mask, net.short, strict=True)]
    params = [theta[i].requires_grad_() for i in learned]
    optimizer = torch.optim.Adam(params, lr=args.meta_lr, eps=args.adam_eps)
    omniglot = Omniglot(args.data_root, cache_dir=args.cache_dir, progress=False)
    train = TaskSampler(omniglot.split("train"), args.ways, args.shots, args.query, seed=args.seed)
    val = TaskSampler(omniglot.split("val"), args.ways, args.shots, 15, seed=VAL_SEED)
    log: list[dict] = []
    window: list[dict] = []
    started = time.perf_counter()
    cpu_started = time.process_time()
    step = 0
    for step in range(args.meta_steps):
        batch = [train.task(step * args.meta_batch + i) for i in range(args.meta_batch)]
        base = [t.detach() for t in theta]
        grads, stats = zip(*(task_step(net, base, task, args) for task in batch), strict=True)
        mean = [torch.stack(parts).mean(0) for parts in zip(*grads, strict=True)]
        if args.method == "maml" or args.method == "fomaml" or args.method == "imaml":
            for i in learned:
                theta[i].grad = mean[i]
        optimizer.step()
        window.extend(stats)
        done = step + 1
        out_of_time = time.perf_counter() - started > 60 * args.max_minutes
        if done % args.log_every == 0 or done == args.meta_steps or out_of_time:
            entry: dict[str, Any] = {"step": done}
            for key in window[0]:
                values = [s[key] for s in window if key in s]
                entry[key] = sum(values) / len(values)
                if key == "meta_grad_norm":  # a few huge meta-gradients stall Adam
                    entry["meta_grad_norm_max"] = max(values)
            window = []
            entry["norms"] = {n: float(t.norm()) for n, t in zip(net.short, theta, strict=True)}
            if args.cos_every and (done % args.cos_every == 0 or done == args.log_every):
                entry["fo_vs_maml"] = gradient_cosines(
                    net, [t.detach() for t in theta], batch, args
                )
            if done % args.eval_every == 0 or done == args.meta_steps or out_of_time:
                acc, ci = evaluate(net, [t.detach() for t in theta], val, args.val_tasks, args)
                entry["val_accuracy"], entry["val_ci95"] = acc, ci
            entry["seconds"] = round(time.perf_counter() - started, 1)
            entry["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
            log.append(entry)
            norms = entry["norms"]
            print(
                f"step {done}: support pre {entry['support_pre']:.3g} post "
                f"{entry['support_post']:.3g} query {entry['query']:.3f} acc "
                f"{entry['accuracy']:.3f} |head.w| {norms['head.w']:.3g} |bn4.w| "
                f"{norms['bn4.w']:.3g} val {entry.get('val_accuracy', float('nan')):.3f} "
                f"({entry['seconds']} s)",
                flush=True,
            )
        if args.save and (done in args.save_at or done == args.meta_steps or out_of_time):
            save_params(net, theta, args, done)
        if out_of_time:
            break
    return {"log": log, "meta_steps": step + 1}


def save_params(net: Net, theta: Vec, args: argparse.Namespace, done: int) -> None:
    """Write the meta-parameters to ``args.save`` (``{step}`` in it is replaced)."""
    path = Path(args.save.replace("{step}", str(done)))
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "params": {n: t.detach().clone() for n, t in zip(net.names, theta, strict=True)},
        "hidden": args.hidden,
        "ways": args.ways,
        "settings": {  # (paths as strings: a weights-only load refuses Path objects)
            k: os.fspath(v) if isinstance(v, os.PathLike) else v
            for k, v in vars(args).items()
            if k != "func"
        },
        "meta_steps": done,
    }
    checkpoint.save(path, checkpoint.plain(state))  # atomic: a cut-short save leaves no file


def load_params(path: str) -> dict[str, Any]:
    """The meta-parameters :func:`save_params` wrote, read by ``bilevel.checkpoint.load``
    (weights only, the archive's checksums and the tensors' sizes checked)."""
    try:
        return checkpoint.load(path, require=("params", "hidden", "ways"))
    except checkpoint.CheckpointError as error:
        raise SystemExit(
            f"{error}\n(this script wrote its parameters with a bare torch.save before f04d727: "
            "such files are refused; write them again with `train --save`)"
        ) from None


def run_check(args: argparse.Namespace) -> dict:
    """The hand-written MAML and first-order MAML meta-gradients of this script against the
    library's ``Reverse`` and ``FirstOrder`` (float64, a few tasks)."""
    dtype = torch.float64
    net = Net(args.ways, args.hidden, dtype, seed=args.seed)
    omniglot = Omniglot(args.data_root, cache_dir=args.cache_dir, progress=False)
    sampler = TaskSampler(
        omniglot.split("train"), args.ways, args.shots, args.query, seed=args.seed
    )
    module = net.module

    def ce(state):
        return F.cross_entropy(state["ll_model"](state["data"]), state["target"])

    rows = []
    for i in range(args.tasks):
        task = sampler.task(i)
        task = {k: (x.to(dtype), y) for k, (x, y) in task.items()}
        theta = net.init()
        row = {"task": i}
        for name, calc, mine in (
            ("maml", Reverse, maml_gradient),
            ("fomaml", FirstOrder, fomaml_gradient),
        ):
            ll = GradientDescent(ce, module, module, args.inner_lr, args.inner_steps)
            problem = BilevelProblem(ll, calc(ce, module, ce, module))
            lib = flat(problem.hypergradient(task["train"], task["test"]))
            own = flat(mine(net, theta, task, args.inner_steps, args.inner_lr))
            row[name] = ratio(lib - own, lib)
        rows.append(row)
        print(row, flush=True)
    return {"relative_difference_library_vs_script": rows}


# ---- command line ----------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` on every subcommand)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-root", default=None, help="folder holding omniglot/ (default: $BILEVEL_DATA)"
        )
        p.add_argument(
            "--cache-dir", default=None, help="decoded Omniglot cache (default: $BILEVEL_CACHE)"
        )
        p.add_argument("--ways", type=count, default=5, help="classes per task (N)")
        p.add_argument("--shots", type=count, default=1, help="support examples per class (K)")
        p.add_argument(
            "--query", type=count, default=5, help="query examples per class (meta-training tasks)"
        )
        p.add_argument("--hidden", type=count, default=32, help="filters per conv block")
        p.add_argument(
            "--seed", type=int, default=0, help="initialization and meta-training task seed"
        )
        p.add_argument("--threads", type=count, default=1, help="torch threads")
        p.add_argument(
            "--max-minutes", type=positive, default=60.0, help="stop after this many minutes"
        )
        p.add_argument(
            "--out",
            default=None,
            help="JSON file to write (default: "
            "benchmarks/results/omniglot_diagnosis_<command>.json)",
        )

    def at_checkpoint(p: argparse.ArgumentParser, tasks: int) -> None:
        """The tasks and inner loop of spikes and curvature (measured at a checkpoint)."""
        p.add_argument("--checkpoint", default=None, help="meta-parameters saved by train --save")
        p.add_argument("--tasks", type=count, default=tasks, help="meta-training tasks to measure")
        p.add_argument(
            "--first-task", type=nonnegative_int, default=100000, help="index of the first task"
        )
        p.add_argument("--reg", type=positive, default=2.0, help="iMAML proximal strength")
        p.add_argument("--inner-steps", type=count, default=20, help="inner gradient steps")
        p.add_argument("--inner-lr", type=positive, default=0.05, help="inner step size")

    t = sub.add_parser(
        "train", help="short meta-training run with diagnostics", formatter_class=fmt
    )
    common(t)
    t.add_argument(
        "--method",
        choices=("maml", "fomaml", "imaml"),
        default="fomaml",
        help="meta-learning method",
    )
    t.add_argument("--meta-steps", type=count, default=300, help="meta-steps (UL steps)")
    t.add_argument("--meta-batch", type=count, default=8, help="tasks per meta-step")
    t.add_argument(
        "--meta-lr", type=positive, default=3e-3, help="Adam step of the meta-parameters"
    )
    t.add_argument(
        "--adam-eps", type=positive, default=1e-8, help="Adam's eps (the iMAML release uses 1e-3)"
    )
    t.add_argument("--inner-steps", type=count, default=1, help="inner (LL) gradient steps")
    t.add_argument("--inner-lr", type=positive, default=0.4, help="inner step size")
    t.add_argument(
        "--zero-head",
        action="store_true",
        help="start every task's head at zero (not meta-learned; Kao et al. 2022)",
    )
    t.add_argument(
        "--inner-params",
        choices=("all", "no-bn"),
        default="all",
        help="what the inner loop adapts: every tensor, or all but batch norm's (Finn et "
        "al.'s code adapts no batch-norm parameter)",
    )
    t.add_argument(
        "--bn-scale",
        choices=("learned", "fixed"),
        default="learned",
        help="batch-norm scale: meta-learned and adapted, or fixed at 1 (Finn et al.'s code "
        "has none)",
    )
    t.add_argument("--reg", type=positive, default=2.0, help="iMAML proximal strength")
    t.add_argument("--cg", type=count, default=5, help="iMAML solver iterations")
    t.add_argument(
        "--solver",
        choices=(
            "library_cg",
            "paper_cg",
            "minres",
            "cg_best_residual",
            "released_cg",
            "none",
            "unrolled",
        ),
        default="library_cg",
        help="iMAML meta-gradient: the library's CG (stops at non-positive curvature), CG "
        "through it (the paper's), MINRES, truncated CG returning its smallest-residual "
        "iterate, the iMAML release's operator 2 I + H / (reg + 10), none (first-order: the "
        "query gradient), or reverse mode through the inner loop",
    )
    t.add_argument(
        "--imaml-inner",
        choices=("proximal", "released"),
        default="proximal",
        help="iMAML inner loop: GD on the proximal objective (examples/omniglot.py), or the "
        "iMAML release's GD on the task loss then one proximal pull",
    )
    t.add_argument(
        "--damping",
        type=nonnegative,
        default=0.0,
        help="iMAML: solve (H + (reg + damping) I) x = g",
    )
    t.add_argument("--log-every", type=count, default=10, help="meta-steps between log records")
    t.add_argument(
        "--cos-every",
        type=nonnegative_int,
        default=50,
        help="meta-steps between first-order/MAML gradient comparisons (0: never)",
    )
    t.add_argument(
        "--curvature-tasks",
        type=nonnegative_int,
        default=2,
        help="tasks of the batch on which --cos-every also measures lr * eig(H_support)",
    )
    t.add_argument("--eval-every", type=count, default=100, help="meta-steps between validations")
    t.add_argument("--val-tasks", type=count, default=100, help="meta-validation tasks")
    t.add_argument(
        "--save",
        default=None,
        help="write the meta-parameters here at the end and at --save-at (for imaml "
        "--checkpoint); '{step}' in it is replaced by the meta-step",
    )
    t.add_argument(
        "--save-at", type=count, nargs="*", default=[], help="meta-steps at which to save too"
    )
    t.set_defaults(func=run_train)

    m = sub.add_parser(
        "imaml", help="iMAML meta-gradients and curvature on sampled tasks", formatter_class=fmt
    )
    common(m)
    m.add_argument(
        "--checkpoint",
        default=None,
        help="meta-parameters saved by train --save (default: the initialization)",
    )
    m.add_argument("--tasks", type=count, default=8, help="meta-training tasks to measure")
    m.add_argument(
        "--first-task",
        type=nonnegative_int,
        default=100000,
        help="index of the first task (of the --seed sampler)",
    )
    m.add_argument(
        "--reg", type=positive, nargs="+", default=[2.0], help="iMAML proximal strengths to measure"
    )
    m.add_argument(
        "--inner",
        choices=("proximal", "released"),
        default="proximal",
        help="inner loop: GD on the proximal objective (examples/omniglot.py), or the iMAML "
        "release's GD on the task loss then one proximal pull",
    )
    m.add_argument("--inner-steps", type=count, default=20, help="inner gradient steps")
    m.add_argument("--inner-lr", type=positive, default=0.05, help="inner step size")
    m.add_argument(
        "--cg-steps",
        type=count,
        nargs="+",
        default=[5],
        help="solver iterations to compare (the first also for the damped solves)",
    )
    m.add_argument(
        "--exact-iters",
        type=count,
        default=3000,
        help="MINRES iterations of the exact solve (to 1e-10)",
    )
    m.add_argument(
        "--lanczos-steps",
        type=count,
        default=60,
        help="Lanczos steps for the extreme eigenvalues of H",
    )
    m.add_argument(
        "--dense", action="store_true", help="also build H densely (small --hidden only)"
    )
    m.add_argument(
        "--maml-lr",
        type=positive,
        default=0.4,
        help="MAML's inner step (1 step) for the comparison",
    )
    m.set_defaults(func=run_imaml)

    k = sub.add_parser(
        "spikes",
        help="size of iMAML's meta-gradient (library CG) over many tasks at a checkpoint",
        formatter_class=fmt,
    )
    common(k)
    at_checkpoint(k, tasks=48)
    k.add_argument("--cg", type=count, default=5, help="CG iterations")
    k.add_argument("--float64", action="store_true", help="float64 instead of float32")
    k.set_defaults(func=run_spikes)

    v = sub.add_parser(
        "curvature",
        help="lambda_min of the support Hessian at iMAML's adapted weights against the "
        "bound that batch norm's scale invariance forces",
        formatter_class=fmt,
    )
    common(v)
    at_checkpoint(v, tasks=6)
    v.set_defaults(func=run_curvature)

    c = sub.add_parser(
        "check",
        help="this script's MAML/FOMAML gradients against the library's",
        formatter_class=fmt,
    )
    common(c)
    c.add_argument("--tasks", type=count, default=3, help="tasks")
    c.add_argument("--inner-steps", type=count, default=1, help="inner steps")
    c.add_argument("--inner-lr", type=positive, default=0.4, help="inner step size")
    c.set_defaults(func=run_check)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values out of range are refused, naming the flag."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.ways < 2:
        parser.error(f"--ways must be >= 2 (a task tells classes apart), got {args.ways}")
    if args.command == "train":
        if args.curvature_tasks > args.meta_batch:
            parser.error(
                f"--curvature-tasks {args.curvature_tasks} is more than the --meta-batch "
                f"{args.meta_batch} tasks it is measured on"
            )
        if args.save_at and args.save is None:
            parser.error("--save-at needs --save, the file to write")
        late = [step for step in args.save_at if step > args.meta_steps]
        if late:
            parser.error(f"--save-at {late[0]} is after the last of --meta-steps {args.meta_steps}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run a subcommand and write its JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = args.func(args)
    out = Path(
        args.out or ROOT / "benchmarks" / "results" / f"omniglot_diagnosis_{args.command}.json"
    )
    record = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "settings": {  # (paths as strings: a weights-only load refuses Path objects)
            k: os.fspath(v) if isinstance(v, os.PathLike) else v
            for k, v in vars(args).items()
            if k != "func"
        },
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git": git_revision(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} thread(s); torch {torch.__version__}",
        "seconds": round(time.perf_counter() - started, 1),
        **result,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()

"""The mappings of ``docs/migrating.md`` ("Coming from another library"), pinned numerically
on the page's own setup (ridge regression with one L2 penalty per feature, float64).

``higher`` runs here, so its MAML loops are compared in-process. The other peers (hypertorch,
BOAT, TorchOpt, Betty, learn2learn) are not installed: each test writes out, as a formula,
what the peer's function computes, and names that function. The exact answer is the ridge
closed form: ``H = (2/n) X^T X + diag(exp(log_l2))`` (constant in ``w``), ``w* = H^{-1} (2/n)
X^T y``, ``v = grad_w L_val``, ``dg/dlambda = diag(exp(log_l2) * w)``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import higher
import pytest
import torch
import torch.nn.functional as F

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import FirstOrder, HypergradientDivergenceError, Implicit, Reverse, Truncated

PAGE = Path(__file__).resolve().parent.parent / "docs" / "migrating.md"
TESTED = re.compile(r"<!-- test -->\s*\n```python\n(.*?)\n```", re.S)
LR = 0.1  # the page's LL step size


def page_blocks() -> list[str]:
    return TESTED.findall(PAGE.read_text())


@pytest.fixture
def page():
    """The namespace of the page's setup block (it sets float64 as the default dtype; the
    fixture puts the previous default back)."""
    dtype = torch.get_default_dtype()
    namespace: dict = {"__name__": "docs_migrating"}
    try:
        exec(compile(page_blocks()[0], "migrating.md[setup]", "exec"), namespace)
        yield namespace
    finally:
        torch.set_default_dtype(dtype)


def closed_form(ns: dict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``H``, ``w*``, ``v`` (for the UL loss times ``scale``) and ``B = dg/dlambda`` at
    ``log_l2 = 0``, and the exact hypergradient ``-B^T H^{-1} v``."""
    x, y, xv, yv = ns["train_x"], ns["train_y"], ns["val_x"], ns["val_y"]
    penalty = torch.ones(x.shape[1])
    h = 2 / len(x) * x.T @ x + torch.diag(penalty)
    w = torch.linalg.solve(h, 2 / len(x) * x.T @ y)
    v = scale * 2 / len(xv) * xv.T @ (xv @ w - yv)
    b = torch.diag(penalty * w)
    return {"H": h, "w": w, "v": v, "B": b, "exact": -b.T @ torch.linalg.solve(h, v)}


def implicit_at_solution(ns: dict, scale: float = 1.0, **settings) -> tuple[torch.Tensor, Implicit]:
    """``Implicit(**settings)``'s hypergradient with the LL started at ``w*`` (one step, which
    moves it by round-off), for the UL loss times ``scale``."""
    ll_model, ul_model = ns["Linear"](10), ns["Penalty"](10)
    with torch.no_grad():
        ll_model.weight.copy_(closed_form(ns)["w"])

    def ul_objective(state):
        return scale * ns["ul_objective"](state)

    ll = GradientDescent(ns["ll_objective"], ll_model, ul_model, lr=LR, iters=1)
    ul = Implicit(ul_objective, ul_model, ns["ll_objective"], ll_model, **settings)
    problem = BilevelProblem(ll, ul)
    [grad] = problem.hypergradient((ns["train_x"], ns["train_y"]), (ns["val_x"], ns["val_y"]))
    return grad, ul


def krylov_iterate(h: torch.Tensor, v: torch.Tensor, j: int) -> torch.Tensor:
    """The j-th conjugate-gradient iterate for ``H q = v`` from 0, as what it is: the Galerkin
    solution on the Krylov space ``span{v, Hv, ..., H^{j-1} v}`` (an orthonormal basis by
    Gram-Schmidt, twice)."""
    basis: list[torch.Tensor] = []
    u = v
    for _ in range(j):
        for _ in range(2):
            for b in basis:
                u = u - (b @ u) * b
        basis.append(u / u.norm())
        u = h @ basis[-1]
    q = torch.stack(basis, dim=1)
    return q @ torch.linalg.solve(q.T @ h @ q, q.T @ v)


def series(h: torch.Tensor, v: torch.Tensor, alpha: float, terms: int) -> torch.Tensor:
    """``alpha * sum_{j < terms} (I - alpha H)^j v``."""
    m = torch.eye(len(v)) - alpha * h
    return alpha * sum(torch.linalg.matrix_power(m, j) @ v for j in range(terms))


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10) -> None:
    assert (actual - expected).norm() <= rtol * expected.norm(), (
        f"relative difference {float((actual - expected).norm() / expected.norm()):.3g}"
    )


# ---- higher (in-process) and the MAML rows of BOAT, TorchOpt and learn2learn -------------


def higher_maml(ns: dict, first_order: bool, mean: bool) -> list[torch.Tensor]:
    """The page's ``higher`` loop (3 SGD steps per task, ``copy_initial_weights=False``); with
    ``first_order``, the inner gradients are detached, as BOAT's FOA does
    (``boat_torch/gm_ol/ngd.py``, ``NGD.optimize``: ``grad_callback=stop_grads``) and
    learn2learn's ``MAML(first_order=True)`` (``learn2learn/algorithms/maml.py``,
    ``MAML.adapt``: gradients without ``create_graph``). ``mean=False`` adds the tasks'
    gradients, as BOAT's ``accumulate_grad=True`` does (``boat_torch/boat_opt.py``,
    ``Problem.run_iter``: one ``higher.innerloop_ctx`` per feed dict, grads added to
    ``.grad``)."""
    net = ns["net"]
    (xs, ys), (xq, yq) = ns["batch"]["train"], ns["batch"]["test"]
    inner_opt = torch.optim.SGD(net.parameters(), lr=LR)
    detach = (lambda grads: [g.detach() for g in grads]) if first_order else None
    for p in net.parameters():
        p.grad = None
    for i in range(len(xs)):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(3):
                diffopt.step(F.mse_loss(fnet(xs[i]), ys[i]), grad_callback=detach)
            loss = F.mse_loss(fnet(xq[i]), yq[i])
            (loss / len(xs) if mean else loss).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = None
    return grads


@pytest.mark.parametrize("method", [Reverse, FirstOrder])
def test_maml_rows_match_higher_and_boat_sums_what_meta_step_averages(page, method):
    """``Reverse`` / ``FirstOrder`` with the same module twice give ``higher``'s MAML /
    first-order MAML gradient, averaged over the tasks as ``meta_step`` does; BOAT's
    ``accumulate_grad`` gives the number of tasks times it."""
    net, task_loss = page["net"], page["task_loss"]
    ll = GradientDescent(task_loss, net, net, lr=LR, iters=3)
    problem = BilevelProblem(ll, method(task_loss, net, task_loss, net))
    ours = problem.meta_hypergradient(page["batch"])
    n_tasks = len(page["batch"]["train"][0])
    first_order = method is FirstOrder
    for mine, mean, summed in zip(
        ours,
        higher_maml(page, first_order, mean=True),
        higher_maml(page, first_order, mean=False),
        strict=True,
    ):
        close(mine, mean, rtol=1e-12)
        close(n_tasks * mine, summed, rtol=1e-12)


def test_learn2learn_meta_sgd_is_a_list_of_learned_step_sizes(page):
    """learn2learn's ``MetaSGD`` (``learn2learn/algorithms/meta_sgd.py``,
    ``meta_sgd_update``: ``w <- w - lr_i * grad_i``, one tensor ``lr_i`` per parameter, second
    order) is ``lr=`` a list of tensors shaped like the parameters; one callable returning the
    list is refused, as the page says."""
    net, task_loss = page["net"], page["task_loss"]

    class Meta(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.lrs = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.full_like(p, LR)) for p in net.parameters()]
            )

    meta = Meta()
    ll = GradientDescent(task_loss, net, meta, lr=list(meta.lrs), iters=3)
    ours = BilevelProblem(ll, Reverse(task_loss, meta, task_loss, net)).meta_hypergradient(
        page["batch"]
    )
    (xs, ys), (xq, yq) = page["batch"]["train"], page["batch"]["test"]
    names = [n for n, _ in net.named_parameters()]
    leaves = [*net.parameters(), *meta.lrs]
    expected = [torch.zeros_like(p) for p in leaves]
    for i in range(len(xs)):
        weights = list(net.parameters())
        for _ in range(3):
            out = torch.func.functional_call(net, dict(zip(names, weights, strict=True)), xs[i])
            grads = torch.autograd.grad(F.mse_loss(out, ys[i]), weights, create_graph=True)
            weights = [w - lr * g for w, lr, g in zip(weights, meta.lrs, grads, strict=True)]
        out = torch.func.functional_call(net, dict(zip(names, weights, strict=True)), xq[i])
        task = torch.autograd.grad(F.mse_loss(out, yq[i]), leaves)
        expected = [e + t / len(xs) for e, t in zip(expected, task, strict=True)]
    for mine, reference in zip(ours, expected, strict=True):
        close(mine, reference, rtol=1e-12)
    with pytest.raises(TypeError, match="must be a tensor or a float"):
        wrong = GradientDescent(task_loss, net, meta, lr=lambda ul: list(ul.lrs), iters=3)
        BilevelProblem(wrong, Reverse(task_loss, meta, task_loss, net)).meta_hypergradient(
            page["batch"]
        )


# ---- the implicit solvers: hypertorch, BOAT, BOHML, TorchOpt, Betty ----------------------


def test_cg_without_a_tolerance_met_is_hypertorch_cg(page):
    """hypertorch ``CG`` (``hypergrad/hypergradients.py``) solves ``(I - dPhi/dw)^T x = v``
    for ``Phi = w - lr grad``, i.e. ``lr H x = v``, with ``K`` steps of ``cg``
    (``hypergrad/CG_torch.py``) and returns ``(dPhi/dlambda)^T x = -lr B^T x``: the K-th CG
    iterate of ``H q = v`` where ``tol`` is not met. So is ``Implicit(method="cg", k=K)``
    (and TorchOpt's ``solve_cg(maxiter=K)``)."""
    cf = closed_form(page)
    for k in (3, 5):
        ours, _ = implicit_at_solution(page, k=k, method="cg")
        close(ours, -cf["B"].T @ krylov_iterate(cf["H"], cf["v"], k), rtol=1e-9)


def test_hypertorch_cg_tolerance_is_absolute_and_returns_the_iterate_before(page):
    """hypertorch's ``cg`` (``hypergrad/CG_torch.py``; BOAT's ``cg_step`` and BOHML's ``cg``
    are the same) stops at the first iteration ``j`` with ``||v - H q_j|| < tol`` (absolute)
    and returns ``q_{j-1}``. With ``||v||`` about 1e3: ``tolerance=tol`` here stops earlier
    than hypertorch, ``tolerance=tol / ||v||`` at the same ``j``, and ``k=j-1`` gives
    hypertorch's result."""
    scale, tol = 1e3, 5e-4
    cf = closed_form(page, scale)
    h, v = cf["H"], cf["v"]
    residuals = [float((v - h @ krylov_iterate(h, v, j)).norm()) for j in range(1, 11)]
    j = next(i + 1 for i, r in enumerate(residuals) if r < tol)
    # the stopping iteration is not a round-off call
    assert residuals[j - 2] > 2 * tol and residuals[j - 1] < tol / 2
    hypertorch = -cf["B"].T @ krylov_iterate(h, v, j - 1)
    _, same_tol = implicit_at_solution(page, scale, k=20, tolerance=tol)
    _, relative = implicit_at_solution(page, scale, k=20, tolerance=tol / float(v.norm()))
    assert int(same_tol.diagnostics["iterations"]) < j - 1
    assert int(relative.diagnostics["iterations"]) == j
    ours, _ = implicit_at_solution(page, scale, k=j - 1, tolerance=0.0)
    close(ours, hypertorch, rtol=1e-9)


@pytest.mark.parametrize("k", [1, 7])
def test_series_count_terms_as_hypertorch_boat_torchopt_and_betty(page, k):
    """With ``M = I - alpha H``: hypertorch ``fixed_point(K)`` sums ``M^j v`` for ``j < K``
    (``hypergrad/hypergradients.py``, ``fixed_point``); hypertorch ``neumann(K)`` and BOAT's
    NS (``boat_torch/utils/op_utils.py``, ``neumann``) for ``j <= K``, with ``alpha`` the LL
    step size; TorchOpt ``solve_inv(ns=True, maxiter=K, alpha=a)`` (``torchopt/linalg/ns.py``,
    ``ns``) and Betty's ``neumann_iterations=K, neumann_alpha=a``
    (``betty/hypergradient/neumann.py``, ``approx_inverse_hvp``) ``a * sum_{j <= K}``."""
    cf = closed_form(page)
    h, v, b = cf["H"], cf["v"], cf["B"]
    fixed_point, _ = implicit_at_solution(page, k=k, method="fixed_point")
    close(fixed_point, -b.T @ series(h, v, LR, k))
    neumann, _ = implicit_at_solution(page, k=k, method="neumann")
    close(neumann, -b.T @ series(h, v, LR, k + 1))
    stepped, _ = implicit_at_solution(page, k=k, method="neumann", alpha=0.3)
    close(stepped, -b.T @ series(h, v, 0.3, k + 1))


def test_torchopt_default_neumann_step_is_one_and_diverges_here(page):
    """TorchOpt's ``solve_inv(ns=True)`` takes ``maxiter=10`` and, without ``alpha``, a step of
    1 (``torchopt/linalg/ns.py``, ``ns``): on the page's problem (``lambda_max(H)`` near 4.8)
    that series diverges. ``Implicit(method="neumann", k=10, alpha=1.0)`` computes the same
    sum and raises; the default ``alpha`` (the LL step) does not."""
    cf = closed_form(page)
    h, v, b = cf["H"], cf["v"], cf["B"]
    assert float(torch.linalg.eigvalsh(h).max()) > 2.0
    torchopt_default = -b.T @ series(h, v, 1.0, 11)
    assert torchopt_default.norm() > 100 * cf["exact"].norm()
    with pytest.raises(HypergradientDivergenceError, match="alpha"):
        implicit_at_solution(page, k=10, method="neumann", alpha=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warned, _ = implicit_at_solution(
            page, k=10, method="neumann", alpha=1.0, on_divergence="warn"
        )
    close(warned, torchopt_default)
    ours, _ = implicit_at_solution(page, k=10, method="neumann")
    close(ours, -b.T @ series(h, v, LR, 11))


def test_hypertorch_reverse_on_the_last_iterates_is_truncated(page):
    """hypertorch ``reverse`` (``hypergrad/hypergradients.py``) given the last ``K + 1``
    iterates and ``K`` maps back-propagates through those ``K`` steps only, from a detached
    ``w_{T-K}``: ``Truncated(truncate_iter=K)``."""
    x, y, xv, yv = page["train_x"], page["train_y"], page["val_x"], page["val_y"]
    steps, keep = 30, 5
    log_l2 = torch.zeros(10, requires_grad=True)
    w = torch.zeros(10)
    for t in range(steps):
        if t <= steps - keep:  # the steps before the last K: no graph
            w = w.detach().requires_grad_()
        loss = F.mse_loss(x @ w, y) + 0.5 * (log_l2.exp() * w**2).sum()
        w = w - LR * torch.autograd.grad(loss, w, create_graph=True)[0]
    [expected] = torch.autograd.grad(F.mse_loss(xv @ w, yv), log_l2)
    ll_model, ul_model = page["Linear"](10), page["Penalty"](10)
    ll = GradientDescent(page["ll_objective"], ll_model, ul_model, lr=LR, iters=steps)
    ul = Truncated(page["ul_objective"], ul_model, page["ll_objective"], ll_model, keep)
    [ours] = BilevelProblem(ll, ul).hypergradient((x, y), (xv, yv))
    close(ours, expected, rtol=1e-12)


def test_the_pages_torchopt_block_returns_the_exact_hypergradient(page):
    """The ``bilevel`` block of the TorchOpt section (100 LL steps, CG with ``k=10``) gives
    the ridge closed form, to the LL's convergence."""
    blocks = page_blocks()
    last = next(i for i, code in enumerate(blocks) if "problem.hypergradient(" in code)
    for i in range(1, last + 1):  # in page order, as a reader runs them
        exec(compile(blocks[i], f"migrating.md[block {i}]", "exec"), page)
    close(page["grad_log_l2"], closed_form(page)["exact"], rtol=1e-8)

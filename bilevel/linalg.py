"""Matrix-free linear solvers on lists of tensors.

Each solver takes ``matvec`` (a function mapping a list of tensors to a list of tensors of the
same shapes, here a Hessian-vector product) and a right-hand side ``b``, and returns the
solution with a :class:`SolverInfo`. The solvers know nothing of models. Iterations run on the
device without host syncs; CG looks at its residual every ``check_every`` iterations to stop
early, and each solver syncs once at the end to fill in its diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

Vector = list[torch.Tensor]
MatVec = Callable[[Vector], Vector]


@dataclass
class SolverInfo:
    """Diagnostics of one solve.

    Attributes:
        method: the solver's name.
        iterations: matrix-vector products spent on the iteration.
        residual_norm: ``||b - A x||`` of the returned ``x``.
        rhs_norm: ``||b||``.
        converged: ``residual_norm <= tolerance * rhs_norm``.
        diverged: the residual grew (Neumann and fixed point), became non-finite, or CG met a
            direction of non-positive curvature (``A`` is not positive definite).
    """

    method: str
    iterations: int
    residual_norm: float
    rhs_norm: float
    converged: bool
    diverged: bool = False

    def as_dict(self) -> dict[str, object]:
        """The diagnostics as a plain dict (for logging)."""
        return asdict(self)


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inner product of two lists of tensors, as a 0-d tensor on their device."""
    terms = [torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def norm(a: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of a list of tensors, as a 0-d tensor."""
    return dot(a, a).sqrt()


def _axpy(alpha: torch.Tensor | float, x: Vector, y: Vector) -> Vector:
    """``y + alpha * x`` elementwise over lists."""
    return [yi + alpha * xi for xi, yi in zip(x, y, strict=True)]


def _summary(
    method: str,
    iterations: torch.Tensor | int,
    residual: torch.Tensor,
    rhs_norm: torch.Tensor,
    tolerance: float,
    broken: torch.Tensor | bool = False,
) -> SolverInfo:
    """Bring the diagnostics to the host in one transfer."""
    values = torch.stack(
        [
            torch.as_tensor(iterations, dtype=residual.dtype, device=residual.device),
            residual,
            rhs_norm,
            torch.as_tensor(broken, dtype=residual.dtype, device=residual.device),
        ]
    ).tolist()
    n_iter, res, rhs, bad = values
    finite = res == res and abs(res) != float("inf")
    return SolverInfo(
        method=method,
        iterations=int(n_iter),
        residual_norm=res,
        rhs_norm=rhs,
        converged=finite and res <= tolerance * rhs,
        diverged=(not finite) or bool(bad),
    )


def cg(
    matvec: MatVec,
    b: Vector,
    iters: int,
    tolerance: float = 1e-10,
    x0: Vector | None = None,
    check_every: int = 10,
    host_checks: bool | None = None,
) -> tuple[Vector, SolverInfo]:
    """Conjugate gradient for ``A x = b`` with ``A`` symmetric positive definite.

    Stops when ``||b - A x|| <= tolerance * ||b||`` or after ``iters`` iterations and returns
    the iterate after its last update. On an accelerator the loop needs no host sync per
    iteration: once converged, later iterations leave ``x`` unchanged (the update is masked on
    the device). On the CPU, where reading a scalar costs nothing, it tests on the host at
    every iteration instead and skips the masking. If a search direction has non-positive
    curvature (``A`` is not positive definite), it stops there and returns the last iterate
    before it, as truncated CG does (Steihaug 1983), with ``info.diverged`` set.

    Reference: Hestenes & Stiefel (1952); used for hypergradients by Pedregosa (2016, HOAG)
    and Rajeswaran et al. (2019, iMAML).

    Args:
        matvec: ``v -> A v`` on lists of tensors.
        b: right-hand side.
        iters: maximum number of iterations (matrix-vector products).
        tolerance: relative residual at which to stop.
        x0: starting point (zeros by default).
        check_every: iterations between host checks of convergence, for an early exit (on an
            accelerator).
        host_checks: test on the host at every iteration (default: when ``b`` is on the CPU).

    Returns:
        ``(x, info)``.
    """
    x = [torch.zeros_like(t) for t in b] if x0 is None else [t.clone() for t in x0]
    r = list(b) if x0 is None else _axpy(-1.0, matvec(x), list(b))
    rr = dot(r, r)
    rhs_norm = norm(b)
    threshold = (tolerance * rhs_norm) ** 2
    if host_checks is None:
        host_checks = rr.device.type == "cpu"
    if host_checks:
        x, n_iter, rr, broken = _cg_checked_on_host(matvec, x, r, rr, threshold, iters)
        return x, _summary("cg", n_iter, rr.sqrt(), rhs_norm, tolerance, broken)
    p = r
    zero = torch.zeros_like(rr)
    n_iter = torch.zeros_like(rr)
    broken = torch.zeros((), dtype=torch.bool, device=rr.device)
    for i in range(iters):
        active = (rr > threshold) & ~broken
        ap = matvec(p)
        pap = dot(p, ap)
        broken = broken | (active & (pap <= 0))
        active = active & (pap > 0)  # on non-positive curvature, keep the last iterate
        alpha = torch.where(active, rr / pap, zero)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = dot(r, r)
        beta = torch.where(active, rr_new / rr, zero)
        p = _axpy(beta, p, r)
        rr = torch.where(active, rr_new, rr)
        n_iter = n_iter + active.to(n_iter.dtype)
        if (i + 1) % check_every == 0 and i + 1 < iters:
            if not bool((rr > threshold) & ~broken):
                break
    return x, _summary("cg", n_iter, rr.sqrt(), rhs_norm, tolerance, broken)


def _cg_checked_on_host(
    matvec: MatVec, x: Vector, r: Vector, rr: torch.Tensor, threshold: torch.Tensor, iters: int
) -> tuple[Vector, int, torch.Tensor, bool]:
    """The iterations of :func:`cg`, tested on the host: ``(x, iterations, r.r, broken)``."""
    p = r
    for i in range(iters):
        if not rr > threshold:
            return x, i, rr, False
        ap = matvec(p)
        pap = dot(p, ap)
        if not pap > 0:
            return x, i, rr, True
        alpha = rr / pap
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = dot(r, r)
        p = _axpy(rr_new / rr, p, r)
        rr = rr_new
    return x, iters, rr, False


def _grew(first: torch.Tensor, before_last: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """True when a residual sequence grew: at its last step, or overall (a divergent series).
    Only these three norms are taken, so the loops pay for no norm per iteration."""
    return (last > before_last * (1 + 1e-6)) | (last > first)


def neumann(
    matvec: MatVec, b: Vector, alpha: float | torch.Tensor, terms: int, tolerance: float = 1e-10
) -> tuple[Vector, SolverInfo]:
    """Truncated Neumann series ``x = alpha * sum_{j=0..terms} (I - alpha A)^j b``.

    The term ``(I - alpha A)^j b`` is also the residual ``b - A x_j`` of the partial sum before
    it, so the series carries its own residual: ``terms + 1`` products give the sum and the
    residual of what is returned. It converges only when ``0 < alpha < 2 / lambda_max(A)``;
    a growing residual sets ``info.diverged``.

    Reference: Lorraine, Vicol & Duvenaud (2020), "Optimizing Millions of Hyperparameters by
    Implicit Differentiation", AISTATS.

    Args:
        matvec: ``v -> A v`` on lists of tensors.
        b: right-hand side.
        alpha: step of the series.
        terms: number of terms after the first (``terms = 0`` returns ``alpha * b``).
        tolerance: relative residual reported as converged (the series is not cut short).

    Returns:
        ``(x, info)``.
    """
    term = list(b)
    x = [torch.zeros_like(t) for t in b]
    previous = term
    for _ in range(terms + 1):
        x = _axpy(alpha, term, x)
        previous, term = term, _axpy(-alpha, matvec(term), term)
    first, last = norm(b), norm(term)
    grew = _grew(first, norm(previous), last)
    return x, _summary("neumann", terms + 1, last, first, tolerance, grew)


def fixed_point(
    matvec: MatVec,
    b: Vector,
    alpha: float | torch.Tensor,
    iters: int,
    tolerance: float = 1e-10,
    x0: Vector | None = None,
) -> tuple[Vector, SolverInfo]:
    """Fixed-point (Richardson) iteration ``x <- x + alpha (b - A x)``.

    Unlike :func:`neumann`, it recomputes the residual from ``x`` at each step, so it can start
    from a warm ``x0`` (the previous UL step's solution). Same convergence condition:
    ``0 < alpha < 2 / lambda_max(A)``; a growing residual sets ``info.diverged``.

    Reference: Grazzi, Franceschi, Pontil & Salzo (2020), "On the Iteration Complexity of
    Hypergradient Computation", ICML.

    Args:
        matvec: ``v -> A v`` on lists of tensors.
        b: right-hand side.
        alpha: step size.
        iters: number of updates of ``x``.
        tolerance: relative residual reported as converged.
        x0: starting point (zeros by default).

    Returns:
        ``(x, info)``.
    """
    x = [torch.zeros_like(t) for t in b] if x0 is None else [t.clone() for t in x0]
    r = list(b) if x0 is None else _axpy(-1.0, matvec(x), list(b))
    start = previous = r
    for _ in range(iters):
        x = _axpy(alpha, r, x)
        previous, r = r, _axpy(-1.0, matvec(x), list(b))
    last = norm(r)
    grew = _grew(norm(start), norm(previous), last)
    return x, _summary("fixed_point", iters, last, norm(b), tolerance, grew)


def power_iteration(matvec: MatVec, like: Vector, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Estimate the eigenvalue of largest magnitude of a symmetric ``A`` (0-d tensor).

    Runs ``iters`` products from a random start (drawn from a private generator, so the global
    RNG is untouched) and returns the Rayleigh quotient of the last iterate. The estimate
    approaches ``|lambda_max|`` from below.

    Reference: von Mises & Pollaczek-Geiringer (1929); used to pick a safe Neumann step.

    Args:
        matvec: ``v -> A v`` on lists of tensors.
        like: tensors giving the shapes, dtype and device of a vector.
        iters: number of products.
        seed: seed of the start vector.
    """
    generator = torch.Generator(device=like[0].device).manual_seed(seed)
    u = [torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device) for t in like]
    eig = torch.zeros((), dtype=like[0].dtype, device=like[0].device)
    for _ in range(iters):
        scale = norm(u).clamp_min(torch.finfo(eig.dtype).tiny)
        u = [t / scale for t in u]
        au = matvec(u)
        eig = dot(u, au)
        u = au
    return eig

"""Matrix-free linear solvers on lists of tensors.

Each solver takes ``matvec`` (a function mapping a list of tensors to a list of tensors of the
same shapes, here a Hessian-vector product) and a right-hand side ``b``, and returns the
solution with a :class:`SolverInfo`. The solvers know nothing of models. Iterations run on the
device without host syncs; CG, MINRES and CG on the normal equations look at their residual
every few iterations to stop early, and each solver syncs once at the end to fill in its
diagnostics (Neumann once more where its recurrence meets the tolerance, to check that claim
against ``b - A x``).

A linear solver is also a value: any callable ``solve(matvec, b) -> x`` on lists of tensors (as
JAXopt's ``solve=``). :func:`make_solver` builds one of the built-in solvers with its settings
bound, :func:`as_solver` wraps a user's callable with the same diagnostics, and
:func:`auto_alpha` picks the step of a series from the operator at each solve.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

Vector = list[torch.Tensor]
MatVec = Callable[[Vector], Vector]
Solve = Callable[[MatVec, Vector], Vector]
"""The contract of a linear solver: ``solve(matvec, b) -> x`` on lists of tensors."""


@dataclass
class SolverInfo:
    """Diagnostics of one solve.

    Attributes:
        method: the solver's name.
        iterations: matrix-vector products spent on the iteration.
        residual_norm: ``||b - A x||`` of the returned ``x``, computed by MINRES, the fixed
            point iteration and a callable solver, by CG and CG on the normal equations where
            they report convergence or run on an accelerator (CG also after a breakdown), and
            by Neumann where its recurrence's residual meets the tolerance (converged or not,
            then). Otherwise CG, CG on the normal equations and Neumann report the residual
            their recurrence updates: equal in exact arithmetic, it drifts below the true one
            with round-off (CG in float32 at condition number 100 reported 5e-11 relative
            where the true one was 2e-6, in float64 at condition number 1e8 9e-11 where it
            was up to 8e-9).
        rhs_norm: ``||b||``.
        converged: ``residual_norm <= tolerance * rhs_norm``.
        diverged: the residual became non-finite, CG met a direction of non-positive
            curvature (``A`` is not positive definite), or a series has a certificate that it
            diverges (see :func:`neumann`).
        curvature_max: for the series, the largest Rayleigh–Ritz value of ``A`` on the
            residuals, a lower bound on ``lambda_max(A)`` (``None`` for the other solvers).
        alpha: the series' step (``None`` for the other solvers).
        lambda_max: the power-iteration estimate of ``lambda_max(A)`` that :func:`auto_alpha`
            set ``alpha`` from (``None`` otherwise).
    """

    method: str
    iterations: int
    residual_norm: float
    rhs_norm: float
    converged: bool
    diverged: bool = False
    curvature_max: float | None = None
    alpha: float | None = None
    lambda_max: float | None = None

    def as_dict(self) -> dict[str, object]:
        """The diagnostics as a plain dict (for logging)."""
        return asdict(self)


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inner product of two lists of tensors, as a real 0-d tensor on their device.

    For complex tensors it is ``Re sum(conj(a) b)``: the inner product of their real and
    imaginary parts taken as pairs of real numbers, the one under which torch's gradient of a
    real loss with respect to a complex tensor (``dL/dRe + i dL/dIm``) is a gradient, and
    Hessian-vector products are symmetric. (``vdot`` alone is complex: its imaginary part
    made CG's tests raise and its step sizes complex.)
    """
    if len(a) == 1 and len(b) == 1:  # the common case, without the list's overhead
        return torch.vdot(a[0].reshape(-1), b[0].reshape(-1)).real
    terms = [torch.vdot(x.reshape(-1), y.reshape(-1)).real for x, y in zip(a, b, strict=True)]
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


def _residual(matvec: MatVec, b: Vector, x: Vector) -> Vector:
    """``b - A x``, computed (not a recurrence's)."""
    return _axpy(-1.0, matvec(x), list(b))


def _true_residual(matvec: MatVec, b: Vector, x: Vector) -> tuple[Vector, torch.Tensor]:
    """``r = b - A x``, computed, and ``<r, r>``: what a recurrence's drifted residual is
    checked against and restarted from."""
    r = _residual(matvec, b, x)
    return r, dot(r, r)


def _start(matvec: MatVec, b: Vector, x0: Vector | None) -> tuple[Vector, Vector]:
    """The starting point (zeros by default) and its residual ``b - A x0``."""
    if x0 is None:
        return [torch.zeros_like(t) for t in b], list(b)
    x = [t.clone() for t in x0]
    return x, _residual(matvec, b, x)


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
    curvature (``A`` is not positive definite), it stops there, as truncated CG does (Steihaug
    1983), with ``info.diverged`` set, and returns the iterate with the smallest residual it
    has computed, or ``x0`` where ``b - A x``, computed afresh at one more product, says that
    is better (the recurrence's residuals drift): on an indefinite ``A`` the direction before
    the breakdown may have had a tiny positive curvature, which sends the last iterate (and
    its residual) arbitrarily far (measured on few-shot Omniglot, iMAML: up to 4,700 times
    the norm of the right-hand side). Without a breakdown the last iterate is returned.

    Reference: Hestenes & Stiefel (1952); used for hypergradients by Pedregosa (2016, HOAG)
    and Rajeswaran et al. (2019, iMAML).

    Args:
        matvec: ``v -> A v`` on lists of tensors, ``A`` symmetric (an :class:`Operator` must
            be marked ``symmetric=True``).
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
    _require_symmetric("cg", matvec)
    x, r = _start(matvec, b, x0)
    rr = dot(r, r)
    rhs_norm = norm(b)
    threshold = (tolerance * rhs_norm) ** 2
    if host_checks is None:
        host_checks = rr.device.type == "cpu"
    if host_checks:
        x, n_iter, rr, broken = _cg_checked_on_host(matvec, b, x, r, rr, threshold, iters)
        return x, _summary("cg", n_iter, rr.sqrt(), rhs_norm, tolerance, broken)
    p = r
    zero = torch.zeros_like(rr)
    n_iter = torch.zeros_like(rr)
    broken = torch.zeros((), dtype=torch.bool, device=rr.device)
    best_x, best_rr = x, rr
    x_start, rr_start = x, rr
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
        better = active & (rr < best_rr)
        best_x = [torch.where(better, xi, bi) for xi, bi in zip(x, best_x, strict=True)]
        best_rr = torch.where(better, rr, best_rr)
        if (i + 1) % check_every == 0 and i + 1 < iters:
            going, stopped = torch.stack([rr > threshold, broken]).tolist()
            if stopped:
                break
            if not going:  # the recurrence passed: b - A x must pass too, else restart from it
                r, rr = _true_residual(matvec, b, x)
                p = r
                if not bool(rr > threshold):
                    return x, _summary("cg", n_iter, rr.sqrt(), rhs_norm, tolerance, broken)
    x = [torch.where(broken, bi, xi) for xi, bi in zip(x, best_x, strict=True)]
    # the recurrence's residual drifts below the true one (see _cg_checked_on_host): the
    # true one is reported, at one more product (no host sync), and after a breakdown x0 is
    # returned where it is the better one
    _, rr = _true_residual(matvec, b, x)
    worse = broken & (rr > rr_start)
    x = [torch.where(worse, si, xi) for xi, si in zip(x, x_start, strict=True)]
    rr = torch.where(worse, rr_start, rr)
    return x, _summary("cg", n_iter, rr.sqrt(), rhs_norm, tolerance, broken)


def _cg_checked_on_host(
    matvec: MatVec,
    b: Vector,
    x: Vector,
    r: Vector,
    rr: torch.Tensor,
    threshold: torch.Tensor,
    iters: int,
) -> tuple[Vector, int, torch.Tensor, bool]:
    """The iterations of :func:`cg`, tested on the host: ``(x, iterations, r.r, broken)``;
    on a breakdown, the iterate with the smallest residual. The recurrence's residual drifts
    below the true one ``b - A x`` (float32, condition number 100: 5e-11 relative where the
    true one was 2e-6): where it passes the threshold, the true one is computed (one more
    product) and must pass too; if it does not, CG restarts from it (residual replacement,
    van der Vorst & Ye 2000), and the run ends reporting the true residual."""
    p = r
    best_x, best_rr = x, rr
    x_start, rr_start = x, rr
    exact = True  # whether r is b - A x as computed, not the recurrence's
    for i in range(iters):
        if not rr > threshold:
            if exact:
                return x, i, rr, False
            r, rr = _true_residual(matvec, b, x)
            p, exact = r, True
            if not rr > threshold:
                return x, i, rr, False
        ap = matvec(p)
        pap = dot(p, ap)
        if not pap > 0:  # the best iterate by the recurrence, unless b - A x says x0 is
            _, best_rr = _true_residual(matvec, b, best_x)
            if best_rr > rr_start:
                return x_start, i, rr_start, True
            return best_x, i, best_rr, True
        alpha = rr / pap
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = dot(r, r)
        p = _axpy(rr_new / rr, p, r)
        rr, exact = rr_new, False
        if rr < best_rr:
            best_x, best_rr = x, rr
    if not rr > threshold and not exact:
        _, rr = _true_residual(matvec, b, x)
    return x, iters, rr, False


# ---- divergence of the series ------------------------------------------------------------
#
# Both series update their residual as r_{j+1} = M r_j with M = I - alpha A, and converge iff
# the eigenvalues of M that b touches lie in (-1, 1). For symmetric A, a Ritz value of M (or of
# M^2) on a subspace of the residuals' span lies between the smallest and the largest of those
# eigenvalues (of their squares), so a Ritz value of M outside [-1, 1], or of M^2 above 1,
# proves that the series diverges for this b: alpha * theta >= 2 or theta < 0 for a Rayleigh
# quotient theta of A, hence alpha * lambda_max(A) >= 2 or A has a negative eigenvalue.
# (Growth of the residual at a step is the case of one residual and M^2.)
# By symmetry, the inner products of the residuals are moments mu_i = <r_0, M^i r_0>:
# <r_j, r_j> = mu_2j and <r_j, r_{j+1}> = mu_{2j+1}. The loops record these two dots per step
# (no extra product, no host sync); the Ritz values on windows of consecutive residuals are
# computed from them on the host, after the one transfer of the diagnostics.

#: windows of residuals looked at, counted from the last: a component that grows dominates the
#: latest residuals, so earlier windows add cost (one small eigenproblem each), not evidence
_LAST_WINDOWS = 16
_WINDOW = 3
"""Residuals per Rayleigh–Ritz window of the divergence certificate. Measured on 300 random
SPD systems (4 to 40 unknowns, condition numbers up to 300) with ``alpha = 1.02 * 2 /
lambda_max`` and 5 to 10 steps of both series, among the 2048 cases where the growing
eigen-components put an error of 3% or more into ``x``: single Rayleigh quotients flag 48% of
them, with the residual's growth 65%, windows of 2 residuals 87%, of 3 90%, of 4 91%, all the
residuals at once (the most these products can tell) 93%."""


def _record(moments: list[torch.Tensor], r: Vector, r_next: Vector) -> None:
    """Append ``<r, r>`` and ``<r, r_next>``, detached: the diagnostics need no graph."""
    moments.append(dot(r, r).detach())
    moments.append(dot(r, r_next).detach())


def _window_ritz(
    moments: np.ndarray, floors: np.ndarray, size: int, power: int, cutoff: float
) -> np.ndarray:
    """Ritz values of ``M^power`` on the spans of ``size`` consecutive residuals.

    The Gram matrix of ``r_s, ..., r_{s+size-1}`` is ``mu_{2s+i+l}`` and their products with
    ``M^power`` are ``mu_{2s+i+l+power}``. Windows with a non-finite moment or a residual at or
    below its floor (``floors[j]`` for ``r_j``) are left out. Directions of a window whose Gram
    eigenvalue (with unit diagonal) is at most ``cutoff`` are dropped: the moments' round-off
    is amplified by the inverse of that eigenvalue.
    """
    length = 2 * size - 1 + power
    if moments.size < length:
        return np.zeros(0)
    rows = np.lib.stride_tricks.sliding_window_view(moments, length)[::2]
    floors = np.lib.stride_tricks.sliding_window_view(floors, size)[: len(rows)]
    if size > 1:  # windows: the last ones only, where a growing component dominates
        rows, floors = rows[-_LAST_WINDOWS:], floors[-_LAST_WINDOWS:]
    index = np.arange(size)[:, None] + np.arange(size)
    squares = rows[:, 2 * np.arange(size)]
    above = squares > floors**2
    usable = np.isfinite(rows).all(-1) & above.all(-1)
    if not usable.any():
        return np.zeros(0)
    rows, scale = rows[usable], 1.0 / np.sqrt(squares[usable])
    outer = scale[:, :, None] * scale[:, None, :]
    gram, image = rows[:, index] * outer, rows[:, index + power] * outer
    values, vectors = np.linalg.eigh(gram)
    keep = values > cutoff
    inverse = np.where(keep, values, 1.0) ** -0.5 * keep
    projected = vectors.transpose(0, 2, 1) @ image @ vectors
    projected = projected * inverse[:, :, None] * inverse[:, None, :]
    # a dropped direction gets the first residual's own quotient, a value already in the set
    diagonal = np.arange(size)
    projected[:, diagonal, diagonal] += np.where(keep, 0.0, image[:, :1, 0])
    return np.linalg.eigvalsh(projected).ravel()


def _ritz_values(moments: np.ndarray, noise: np.ndarray, power: int, eps: float) -> np.ndarray:
    """Ritz values of ``M^power`` on each residual and on windows of ``_WINDOW``.

    Round-off floor. ``noise[j]`` bounds the size of the terms whose difference is the
    residual ``r_j``, so ``r_j`` is computed to about ``eps * noise[j]``: ``||b||`` for the
    Neumann recurrence, ``||b|| + ||A|| ||x_j||`` for fixed point (which recomputes ``b - A x``;
    ``||A|| < 2 / alpha`` whenever the series converges). Near that level its changes from step
    to step are noise: this is the false alarm of a growth test at round-off. Below
    ``sqrt(eps) * noise[j]`` nothing counts: the answer is then as accurate as this precision
    lets a residual certify (relative residual ``sqrt(eps)``, ``1.5e-8`` in float64, below any
    tolerance a series is run to there), so a flag would change no decision; above it the
    noise is at most ``sqrt(eps)`` relative, which the margin in :func:`_series_summary`
    covers. A window amplifies that noise by up to ``1 / cutoff``, so windows count from
    ``eps^(1/4) * noise`` on, with a cutoff of ``eps^(1/4)``: amplified, the noise is again
    ``eps^(3/4) / eps^(1/4) = sqrt(eps)``.
    """
    singles = _window_ritz(moments, eps**0.5 * noise, 1, power, 0.0)
    windows = _window_ritz(moments, eps**0.25 * noise, _WINDOW, power, eps**0.25)
    return np.concatenate([singles, windows])


def _noise_scales(rhs_norm: float, x_squares: np.ndarray, alpha: float, count: int) -> np.ndarray:
    """For each of ``count`` residuals, the size of the terms it is the difference of:
    ``||b||`` (Neumann), or ``||b|| + (2 / alpha) ||x_j||`` (fixed point, given
    ``x_squares``), an upper bound of ``||b|| + ||A x_j||`` while the series converges."""
    if not len(x_squares):
        return np.full(count, rhs_norm)
    return rhs_norm + 2 * np.sqrt(x_squares) / abs(alpha)


def _symmetric(matvec: MatVec) -> bool:
    """Whether the series may assume a symmetric operator: plain callables are taken to be
    (as documented); an :class:`Operator` says."""
    return not isinstance(matvec, Operator) or matvec.symmetric


def _require_symmetric(name: str, matvec: MatVec) -> None:
    """Refuse an :class:`Operator` that does not say it is symmetric (a plain callable is taken
    to be, as for the series). CG and MINRES assume ``A = A^T``: on a non-symmetric ``A`` they
    return a wrong ``x`` without a sign of it (MINRES even reports a residual that is not
    ``||b - A x||``, below the true one)."""
    if isinstance(matvec, Operator) and not matvec.symmetric:
        raise ValueError(
            f"{name} needs a symmetric A, but it was given an Operator with symmetric=False "
            "(such as the system (I - dPhi/dw)^T q = v of a fixed-point map): use normal_cg "
            "(any nonsingular A), or Operator(matvec, symmetric=True) if A is symmetric."
        )


def _series_summary(
    method: str,
    iterations: int,
    moments: list[torch.Tensor],
    x_squares: list[torch.Tensor],
    rhs_norm: torch.Tensor,
    alpha: float | torch.Tensor,
    tolerance: float,
    symmetric: bool = True,
) -> SolverInfo:
    """Diagnostics of a series, brought to the host in one transfer.

    The Rayleigh-Ritz certificate holds for a symmetric ``A`` only: a non-normal ``M`` can
    grow a residual for a while and still converge, so for an :class:`Operator` marked
    non-symmetric the series is declared diverged only when its last residual is above the
    first (the answer is then worse than zero) or not finite.

    ``moments`` are ``<r_j, r_j>`` and ``<r_j, r_{j+1}>`` for each step, then the last
    ``<r, r>``; ``x_squares`` are ``<x_j, x_j>`` for each residual (fixed point) or empty
    (Neumann, whose residual does not come from ``x``).
    """
    dtype = moments[0].dtype
    step = torch.as_tensor(alpha, dtype=dtype, device=rhs_norm.device).detach()
    host = torch.stack([*moments, *x_squares, rhs_norm.detach(), step]).to("cpu", torch.float64)
    host = host.numpy()  # small host arrays: NumPy's per-call cost is a fraction of torch's
    moments_h, rhs, alpha_h = host[: len(moments)], float(host[-2]), float(host[-1])
    noise = _noise_scales(rhs, host[len(moments) : -2], alpha_h, len(moments) // 2 + 1)
    eps = torch.finfo(dtype).eps
    ritz = _ritz_values(moments_h, noise, 1, eps)  # of M = I - alpha A
    ritz_squared = _ritz_values(moments_h, noise, 2, eps)  # of M^2
    # Relative margin for round-off: 1e-6, and in low precision the noise of the residuals at
    # the floor (sqrt(eps) each; a ratio of squared norms adds up four such errors).
    bound = 1.0 + max(1e-6, 16 * eps**0.5)
    certified = bool((np.abs(ritz) > bound).any()) or bool((ritz_squared > bound).any())
    residual = math.sqrt(moments_h[-1]) if moments_h[-1] >= 0 else float("nan")
    if not symmetric:
        certified = residual > rhs * bound
    finite = math.isfinite(residual)
    curvature = float(((1 - ritz) / alpha_h).max()) if ritz.size and alpha_h else None
    return SolverInfo(
        method=method,
        iterations=iterations,
        residual_norm=residual,
        rhs_norm=rhs,
        converged=finite and residual <= tolerance * rhs,
        diverged=(not finite) or certified,
        curvature_max=curvature,
        alpha=alpha_h,
    )


def neumann(
    matvec: MatVec, b: Vector, alpha: float | torch.Tensor, terms: int, tolerance: float = 1e-10
) -> tuple[Vector, SolverInfo]:
    """Truncated Neumann series ``x = alpha * sum_{j=0..terms} (I - alpha A)^j b``.

    The term ``(I - alpha A)^j b`` is also the residual ``b - A x_j`` of the partial sum before
    it, so the series carries its own residual: ``terms + 1`` products give the sum and the
    residual of what is returned. That residual drifts below the true one with round-off, so
    where it meets ``tolerance`` one more product computes ``b - A x``, which is reported.
    It converges only when ``0 < alpha < 2 / lambda_max(A)`` (``A`` symmetric positive
    definite). ``info.diverged`` is set when the residuals certify
    that it does not: a Rayleigh–Ritz value of ``I - alpha A`` on one residual or on a window
    of consecutive ones lies outside ``[-1, 1]`` (``alpha * theta >= 2`` or ``theta < 0`` for
    a Rayleigh quotient ``theta`` of ``A``), or the residual grew at a step, above a round-off
    floor. This catches a step slightly too large within a few terms, before the residual
    grows. ``info.curvature_max`` is the largest such ``theta``.

    Reference: Lorraine, Vicol & Duvenaud (2020), "Optimizing Millions of Hyperparameters by
    Implicit Differentiation", AISTATS; Rayleigh–Ritz bounds: Parlett (1998), "The Symmetric
    Eigenvalue Problem", ch. 11.

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
    moments: list[torch.Tensor] = []
    for _ in range(terms + 1):
        x = _axpy(alpha, term, x)
        following = _axpy(-alpha, matvec(term), term)
        _record(moments, term, following)
        term = following
    moments.append(dot(term, term).detach())
    info = _series_summary(
        "neumann", terms + 1, moments, [], norm(b), alpha, tolerance, _symmetric(matvec)
    )
    if info.converged:
        # The recurrence's residual drifts below the true one (float32, condition number 100:
        # 8e-19 relative where b - A x was 2.4e-5, above a tolerance of 1e-5), so a claim is
        # checked at one more product (and one more host read).
        true_residual = float(norm(_residual(matvec, b, x)))
        info = replace(
            info, residual_norm=true_residual, converged=true_residual <= tolerance * info.rhs_norm
        )
    return x, info


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
    from a warm ``x0`` (the previous UL step's solution). Same convergence condition,
    ``0 < alpha < 2 / lambda_max(A)``, and the same divergence certificate and
    ``info.curvature_max``.

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
    x, r = _start(matvec, b, x0)
    moments: list[torch.Tensor] = []
    x_squares: list[torch.Tensor] = []
    for _ in range(iters):
        x_squares.append(dot(x, x).detach())
        x = _axpy(alpha, r, x)
        following = _residual(matvec, b, x)
        _record(moments, r, following)
        r = following
    x_squares.append(dot(x, x).detach())
    moments.append(dot(r, r).detach())
    info = _series_summary(
        "fixed_point", iters, moments, x_squares, norm(b), alpha, tolerance, _symmetric(matvec)
    )
    return x, info


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
    eig = torch.zeros((), dtype=like[0].dtype, device=like[0].device).real
    for _ in range(iters):
        scale = norm(u).clamp_min(torch.finfo(eig.dtype).tiny)
        u = [t / scale for t in u]
        au = matvec(u)
        eig = dot(u, au)
        u = au
    return eig


# ---- solvers for symmetric indefinite and non-symmetric systems ---------------------------


def _check_interval(t: torch.Tensor) -> int:
    """Iterations between host checks for an early exit: every one on the CPU, where reading
    a scalar costs nothing, every ten on an accelerator."""
    return 1 if t.device.type == "cpu" else 10


def _positive(t: torch.Tensor) -> torch.Tensor:
    """``t`` clamped to the smallest positive normal number of its dtype, for a safe division."""
    return t.clamp_min(torch.finfo(t.dtype).tiny)


def _lanczos(
    matvec: MatVec, v: Vector, v_prev: Vector, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Vector]:
    """One Lanczos step: ``(alpha, beta_next, v_next)`` with
    ``beta_next v_next = A v - alpha v - beta v_prev``."""
    w = _axpy(-beta, v_prev, matvec(v))
    alpha = dot(v, w)
    w = _axpy(-alpha, v, w)
    beta_next = norm(w)
    return alpha, beta_next, [t / _positive(beta_next) for t in w]


def _rotation(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Givens rotation ``(c, s, r)`` with ``[c s; -s c] [a; b] = [r; 0]``."""
    r = torch.hypot(a, b)
    return a / _positive(r), b / _positive(r), r


def minres(
    matvec: MatVec, b: Vector, iters: int, tolerance: float = 1e-10, x0: Vector | None = None
) -> tuple[Vector, SolverInfo]:
    """MINRES for ``A x = b`` with ``A`` symmetric, possibly indefinite.

    Minimizes ``||b - A x||`` over the Krylov space at each iteration: Lanczos builds the
    tridiagonal projection of ``A``, Givens rotations keep its QR factorization up to date, and
    ``x`` is updated through three-term search directions, so memory stays constant. Stops when
    the residual (from the rotations, no extra product) is below ``tolerance * ||b||``, or,
    before a step, when the iterate already solves the least-squares problem to
    ``t = min(tolerance, sqrt(eps))`` (``||A r|| <= t ||A|| ||r||``, also from the rotations:
    Paige & Saunders' second test; capped so that a loose tolerance does not take a
    nonsingular system of condition number up to ``1 / sqrt(eps)`` for a singular one); after
    that, iterations until the next host check leave ``x`` unchanged. Unlike CG it needs no
    positive definiteness: a saddle point of the LL (an indefinite Hessian) is solved, not
    flagged. On a singular, consistent system it returns, from ``x0 = 0``, the minimum-norm
    solution; on an inconsistent one (``b`` has a component in the null space: an LL with a
    flat direction the UL sees) a least-squares solution, not necessarily the minimum-norm one
    (Choi, Paige & Saunders 2011), with ``converged`` false: without the least-squares test
    its next step divides by a round-off pivot (``||x||`` near 1e13 on a 6 x 6 system). On
    larger ones (20 to 50 unknowns, tolerance 1e-10) the test can miss that step: ``||x||``
    near 1e14, reported as ``diverged``. In float32 a matrix singular in exact arithmetic is
    stored with eigenvalues of round-off size in its null directions, and a tolerance below
    float32's reach keeps MINRES iterating into them: on a 6 x 6 system with 3 null
    directions and tolerance 1e-10, the relative residual was 9e-8 after 10 iterations and
    0.95 after 200, ``x`` far from the minimum-norm solution, with ``converged`` false but
    ``diverged`` not set. Give float32 a tolerance it can reach (``1e-6``).

    The rotations' residual drifts from the true one on ill-conditioned systems (measured: a
    claimed relative residual below 1e-10 where the true one is 1e-4, condition number 1e8),
    so one extra product at the end gives ``info.residual_norm = ||b - A x||`` and
    ``converged``; ``info.diverged`` is set when that residual is not finite or above the
    starting one ``||b - A x0||``, which MINRES never exceeds in exact arithmetic.

    References: Paige & Saunders (1975), "Solution of Sparse Indefinite Systems of Linear
    Equations", SIAM J. Numer. Anal.; Choi, Paige & Saunders (2011), "MINRES-QLP: a Krylov
    subspace method for indefinite or singular symmetric systems", SIAM J. Sci. Comput.

    Args:
        matvec: ``v -> A v`` on lists of tensors, ``A`` symmetric (an :class:`Operator` must
            be marked ``symmetric=True``).
        b: right-hand side.
        iters: maximum number of iterations (matrix-vector products).
        tolerance: relative residual at which to stop.
        x0: starting point (zeros by default).

    Returns:
        ``(x, info)``; ``info.residual_norm`` is ``||b - A x||``.
    """
    _require_symmetric("minres", matvec)
    x, r = _start(matvec, b, x0)
    rhs_norm, beta = norm(b), norm(r)
    start, threshold = beta, tolerance * rhs_norm
    zero, one = torch.zeros_like(beta), torch.ones_like(beta)
    v_prev, v = [torch.zeros_like(t) for t in r], [t / _positive(beta) for t in r]
    d_prev, d_prev2 = [torch.zeros_like(t) for t in r], [torch.zeros_like(t) for t in r]
    c_prev, s_prev, c_prev2, s_prev2 = one, zero, one, zero
    eta, n_iter, interval = beta, zero, _check_interval(beta)
    a_norm, stopped = zero, torch.zeros((), dtype=torch.bool, device=beta.device)
    # the least-squares test's level: the tolerance, at most sqrt(eps) (a loose residual
    # tolerance does not make a system of condition number 1e5 singular: at 1e-4 it stopped
    # diag(1, 1e-5) after one step, 71% off, where two steps solve it)
    singular = min(tolerance, torch.finfo(beta.dtype).eps ** 0.5)
    moved = False  # whether x may differ from x0
    for i in range(iters):
        active = (eta.abs() > threshold) & ~stopped
        if i % interval == 0 and not bool(active):
            break
        alpha, beta_next, v_next = _lanczos(matvec, v, v_prev, beta)
        # the new column of the tridiagonal matrix, through the last two rotations
        epsilon, delta_bar = s_prev2 * beta, c_prev2 * beta
        delta = c_prev * delta_bar + s_prev * alpha
        gamma_bar = c_prev * alpha - s_prev * delta_bar
        # ||A r|| = |eta| hypot(gamma_bar, c_prev beta_next) for the current iterate; a column
        # norm of the tridiagonal matrix is a lower bound of ||A|| (its first column has no
        # entry above alpha: beta is ||r0|| there, not an entry of A's projection)
        above = beta**2 if i > 0 else zero
        a_norm = torch.maximum(a_norm, torch.sqrt(alpha**2 + above + beta_next**2))
        solved = torch.hypot(gamma_bar, c_prev * beta_next) <= singular * a_norm
        stopped = stopped | (active & solved)
        active = active & ~solved
        c, s, gamma = _rotation(gamma_bar, beta_next)
        d = [
            (vi - delta * di - epsilon * dj) / _positive(gamma)
            for vi, di, dj in zip(v, d_prev, d_prev2, strict=True)
        ]
        x = [torch.where(active, xi + c * eta * di, xi) for xi, di in zip(x, d, strict=True)]
        eta, moved = torch.where(active, -s * eta, eta), True
        n_iter = n_iter + active.to(n_iter.dtype)
        v_prev, v, beta = v, v_next, beta_next
        d_prev2, d_prev = d_prev, d
        c_prev2, s_prev2, c_prev, s_prev = c_prev, s_prev, c, s
    # the true residual, not the rotations' drifted one (x is x0 where no step ran)
    residual = norm(_residual(matvec, b, x)) if moved else start
    grew = residual > start * (1 + torch.finfo(start.dtype).eps ** 0.5)
    return x, _summary("minres", n_iter, residual, rhs_norm, tolerance, grew)


def normal_cg(
    matvec: MatVec,
    b: Vector,
    iters: int,
    tolerance: float = 1e-10,
    rmatvec: MatVec | None = None,
) -> tuple[Vector, SolverInfo]:
    """Conjugate gradient on the normal equations ``A^T A x = A^T b``, for any nonsingular
    (non-symmetric or indefinite) square ``A``.

    Runs CG in the CGLS form, which keeps the residual ``r = b - A x`` of the original system
    (not the normal equations' ``A^T r``) and stops when ``||r|| <= tolerance * ||b||``. Each
    iteration costs one product with ``A`` and one with ``A^T``. The convergence rate depends
    on ``cond(A)^2``: prefer :func:`cg` or :func:`minres` when ``A`` is symmetric. The
    recurrence's residual drifts below the true one with round-off: where it meets the
    tolerance, ``b - A x`` is computed (one more product) and must meet it too, or the
    iteration restarts from it (as :func:`cg` does).

    Reference: Hestenes & Stiefel (1952), section 10 (CGLS); as ``CG_normaleq`` of hypertorch
    (Grazzi, Franceschi, Pontil & Salzo 2020, ICML).

    Args:
        matvec: ``v -> A v`` on lists of tensors.
        b: right-hand side.
        iters: maximum number of iterations (products with ``A``).
        tolerance: relative residual of ``A x = b`` at which to stop.
        rmatvec: ``u -> A^T u``; by default :func:`transpose` of ``matvec``.

    Returns:
        ``(x, info)``; ``info.residual_norm`` is ``||b - A x||`` where the recurrence's
        residual met the tolerance and on an accelerator, else the recurrence's.
    """
    rmatvec = transpose(matvec, b) if rmatvec is None else rmatvec
    x, r = [torch.zeros_like(t) for t in b], list(b)
    p = s = rmatvec(r)
    gamma, rr, rhs_norm = dot(s, s), dot(r, r), norm(b)
    threshold = (tolerance * rhs_norm) ** 2
    zero = torch.zeros_like(rr)
    n_iter, interval = zero, _check_interval(rr)
    exact = True  # whether r is b - A x as computed, not the recurrence's
    for i in range(iters):
        active = rr > threshold
        if i % interval == 0 and not bool(active):
            if exact:
                break
            # the recurrence's residual drifts below the true one (float32, condition
            # number 100: 2e-12 relative where b - A x was 3e-7): it must pass too, or the
            # iteration restarts from it
            r, rr = _true_residual(matvec, b, x)
            exact = True
            if not bool(rr > threshold):
                break
            p = s = rmatvec(r)
            gamma, active = dot(s, s), rr > threshold
        q = matvec(p)
        qq = dot(q, q)
        step = torch.where(active & (qq > 0), gamma / qq, zero)
        x, r = _axpy(step, p, x), _axpy(-step, q, r)
        s = rmatvec(r)
        gamma_next, rr = dot(s, s), dot(r, r)
        p = _axpy(torch.where(active & (gamma > 0), gamma_next / gamma, zero), p, s)
        gamma, exact = gamma_next, False
        n_iter = n_iter + active.to(n_iter.dtype)
    if not exact and (interval > 1 or not bool(rr > threshold)):
        # a claim the loop did not check (on an accelerator: always, with no host sync)
        _, rr = _true_residual(matvec, b, x)
    return x, _summary("normal_cg", n_iter, rr.sqrt(), rhs_norm, tolerance)


# ---- operators and their transpose --------------------------------------------------------


class Operator:
    """A linear operator ``v -> A v`` on lists of tensors, callable like a matvec, that may
    also know its transpose product (``rmatvec``) or that it is symmetric.

    Reference: as SciPy's ``scipy.sparse.linalg.LinearOperator`` (``matvec``/``rmatvec``).
    """

    def __init__(
        self, matvec: MatVec, rmatvec: MatVec | None = None, symmetric: bool = False
    ) -> None:
        if not callable(matvec):
            raise TypeError(f"Operator: matvec must be callable, got {type(matvec).__name__}")
        if rmatvec is not None and not callable(rmatvec):
            raise TypeError(
                f"Operator: rmatvec must be callable or None, got {type(rmatvec).__name__}"
            )
        if not isinstance(symmetric, bool):
            raise TypeError(f"Operator: symmetric must be a bool, got {symmetric!r}")
        self.matvec = matvec
        self.rmatvec = rmatvec
        self.symmetric = symmetric

    def __call__(self, v: Vector) -> Vector:
        """``A v``."""
        return self.matvec(v)

    def __repr__(self) -> str:
        return f"Operator(rmatvec={self.rmatvec is not None}, symmetric={self.symmetric})"


def transpose(matvec: MatVec, like: Vector) -> MatVec:
    """The transpose product ``u -> A^T u`` of a matvec.

    An :class:`Operator` marked symmetric is its own transpose, and one with ``rmatvec`` gives
    it. Otherwise the transpose comes from autograd, ``A^T u = grad_x <u, A x>`` (the
    vector-Jacobian product of a linear map): ``matvec`` is applied once, here, to a zero
    ``x`` requiring grad, and its graph is kept for every product. That needs ``matvec`` to be
    differentiable in its input.

    Reference: Griewank & Walther (2008), "Evaluating Derivatives", ch. 3 (reverse mode
    gives ``A^T u`` at the cost of a product with ``A``).

    Args:
        matvec: ``v -> A v`` on lists of tensors (square: ``A v`` is shaped like ``v``).
        like: tensors giving the shapes, dtype and device of ``v``.

    Raises:
        TypeError: when ``A x`` does not depend on ``x`` through autograd.
    """
    if isinstance(matvec, Operator):
        if matvec.symmetric:
            return matvec
        if matvec.rmatvec is not None:
            return matvec.rmatvec
        matvec = matvec.matvec
    return _autograd_transpose(matvec, like)


def _autograd_transpose(matvec: MatVec, like: Vector) -> MatVec:
    """``u -> grad_x <u, A x>`` at ``x = 0``, on one recorded application of ``matvec``."""
    with torch.enable_grad():
        x = [torch.zeros_like(t, requires_grad=True) for t in like]
        out = list(matvec(x))
    linked = [i for i, t in enumerate(out) if t.requires_grad]
    if not linked:
        raise TypeError(
            "transpose: the matvec's output does not depend on its input through autograd, "
            "so A^T cannot be derived from it. Pass rmatvec= (u -> A^T u), or wrap it as "
            "Operator(matvec, symmetric=True) if A is symmetric."
        )

    def rmatvec(u: Vector) -> Vector:
        grads = torch.autograd.grad(
            [out[i] for i in linked],
            x,
            grad_outputs=[u[i] for i in linked],
            retain_graph=True,
            allow_unused=True,
        )
        return [torch.zeros_like(t) if g is None else g for t, g in zip(like, grads, strict=True)]

    return rmatvec


# ---- solvers as values ---------------------------------------------------------------------

SOLVERS = ("cg", "neumann", "fixed_point", "minres", "normal_cg")
"""Names of the built-in solvers that :func:`make_solver` builds."""

_SERIES = ("neumann", "fixed_point")


class Solver:
    """A linear solver as a value: ``solver(matvec, b) -> x`` on lists of tensors, the
    library's contract for a solver (as JAXopt's ``solve=``), and ``solver.run(matvec, b) ->
    (x, info)`` with its :class:`SolverInfo`.

    Build one with :func:`make_solver`, :func:`as_solver` or :func:`auto_alpha`.

    Reference: Blondel et al. (2022), "Efficient and Modular Implicit Differentiation",
    NeurIPS (JAXopt's ``solve`` argument).
    """

    def __init__(
        self, name: str, run: Callable[[MatVec, Vector], tuple[Vector, SolverInfo]]
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Solver: name must be a str, got {name!r}")
        if not callable(run):
            raise TypeError(f"Solver: run must be callable, got {type(run).__name__}")
        self.name = name
        self._run = run

    def run(self, matvec: MatVec, b: Vector) -> tuple[Vector, SolverInfo]:
        """Solve ``A x = b``: ``(x, info)``."""
        return self._run(matvec, b)

    def __call__(self, matvec: MatVec, b: Vector) -> Vector:
        """Solve ``A x = b``: ``x``."""
        return self.run(matvec, b)[0]

    def __repr__(self) -> str:
        return f"Solver({self.name!r})"


def _check_count(name: str, value: object, minimum: int = 0) -> int:
    """``value`` as an int of at least ``minimum``; booleans are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return int(value)


def _check_number(name: str, value: object, positive: bool = False) -> float:
    """``value`` as a finite, non-negative (or positive) float; booleans are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")
    return number


def make_solver(
    name: str, iters: int, tolerance: float = 1e-10, alpha: float | str | None = None
) -> Solver:
    """A built-in solver with its settings bound.

    Args:
        name: one of :data:`SOLVERS`: ``"cg"`` (:func:`cg`), ``"neumann"`` (:func:`neumann`),
            ``"fixed_point"`` (:func:`fixed_point`), ``"minres"`` (:func:`minres`) or
            ``"normal_cg"`` (:func:`normal_cg`).
        iters: iterations (``terms`` for the Neumann series).
        tolerance: relative residual at which to stop or report convergence.
        alpha: the step of the two series, required for them and refused by the others: a
            number ``0 < alpha < 2 / lambda_max(A)``, or ``"auto"`` for :func:`auto_alpha`.

    Reference: see each solver.
    """
    if not isinstance(name, str) or name not in SOLVERS:
        raise ValueError(f"make_solver: name must be one of {SOLVERS}, got {name!r}")
    iters = _check_count("iters", iters)
    tolerance = _check_number("tolerance", tolerance)
    if name in _SERIES:
        return _make_series(name, iters, tolerance, alpha)
    if alpha is not None:
        raise ValueError(
            f"make_solver: alpha is the step of the series {_SERIES}; {name!r} takes none, "
            f"got alpha={alpha!r}"
        )
    solve = {"cg": cg, "minres": minres, "normal_cg": normal_cg}[name]
    return Solver(name, lambda matvec, b: solve(matvec, b, iters, tolerance))


def _make_series(name: str, iters: int, tolerance: float, alpha: object) -> Solver:
    """:func:`make_solver` for the Neumann and fixed-point series."""
    if alpha is None:
        raise ValueError(
            f"make_solver({name!r}): alpha is required: a step 0 < alpha < 2 / lambda_max(A), "
            "or alpha='auto' to take 1 / lambda_max from power iteration"
        )
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ValueError(f"make_solver: alpha must be a number or 'auto', got {alpha!r}")
        return auto_alpha(lambda step: make_solver(name, iters, tolerance, step))
    step = _check_number("alpha", alpha, positive=True)
    series = neumann if name == "neumann" else fixed_point
    return Solver(name, lambda matvec, b: series(matvec, b, step, iters, tolerance))


def as_solver(solve: Solve, tolerance: float = 1e-10) -> Solver:
    """A user's solver ``solve(matvec, b) -> x`` as a :class:`Solver` with diagnostics.

    ``run`` checks that ``x`` is a list or tuple of tensors with ``b``'s shapes, dtypes and
    devices, then spends one extra product on the residual ``||b - A x||``: ``converged``
    against ``tolerance``, ``diverged`` if it is not finite. ``info.iterations`` counts the
    products ``solve`` made. A :class:`Solver` is returned unchanged.

    Reference: Blondel et al. (2022), "Efficient and Modular Implicit Differentiation",
    NeurIPS (a solver as an argument).

    Raises:
        TypeError, ValueError: at ``run``, when ``x`` is not shaped like ``b``.
    """
    if isinstance(solve, Solver):
        return solve
    if not callable(solve):
        raise TypeError(f"as_solver: solve must be callable, got {type(solve).__name__}")
    tolerance = _check_number("tolerance", tolerance)
    name = getattr(solve, "__name__", type(solve).__name__)

    def run(matvec: MatVec, b: Vector) -> tuple[Vector, SolverInfo]:
        calls = [0]
        x = _check_solution(solve(_counting(matvec, calls), b), b, name)
        residual = norm(_residual(matvec, b, [t.detach() for t in x]))
        return x, _summary(name, calls[0], residual, norm(b), tolerance)

    return Solver(name, run)


def _counting(matvec: MatVec, calls: list[int]) -> MatVec:
    """``matvec`` counting its calls in ``calls[0]`` (an :class:`Operator` stays one)."""

    def counted(v: Vector) -> Vector:
        calls[0] += 1
        return matvec(v)

    if isinstance(matvec, Operator):
        return Operator(counted, matvec.rmatvec, matvec.symmetric)
    return counted


def _check_solution(x: object, b: Vector, name: str) -> Vector:
    """``x`` as a list, if it is a list or tuple of tensors shaped like ``b``."""
    expected = "a list or tuple of tensors shaped like b (x alone, not (x, info))"
    if not isinstance(x, list | tuple):
        raise TypeError(f"solver {name!r} must return {expected}, got {type(x).__name__}")
    if len(x) != len(b):
        raise ValueError(f"solver {name!r} returned {len(x)} tensors; b has {len(b)}")
    for i, (xi, bi) in enumerate(zip(x, b, strict=True)):
        if not isinstance(xi, torch.Tensor):
            raise TypeError(f"solver {name!r} must return {expected}; x[{i}] is a {type(xi)}")
        if (xi.shape, xi.dtype, xi.device) != (bi.shape, bi.dtype, bi.device):
            raise ValueError(
                f"solver {name!r} returned x[{i}] of shape {tuple(xi.shape)}, {xi.dtype} on "
                f"{xi.device}; expected b[{i}]'s shape {tuple(bi.shape)}, {bi.dtype} on "
                f"{bi.device}"
            )
    return list(x)


def auto_alpha(make: Callable[[float], Solver], power_iters: int = 20) -> Solver:
    """A series solver whose step is set from the operator at each solve.

    At each ``run``, estimates ``lambda_max(A)`` with ``power_iters`` products of
    :func:`power_iteration` and runs ``make(1 / lambda_max)``: a step inside
    ``(0, 2 / lambda_max)`` as long as the estimate, a lower bound, is above half the true
    value (20 products estimated 6999.997 for a true 7000 in the solvers audit). The info
    records ``lambda_max`` and the ``alpha`` used.

    Reference: Lorraine, Vicol & Duvenaud (2020), AISTATS (the Neumann step must be below
    ``2 / lambda_max``); power iteration: von Mises & Pollaczek-Geiringer (1929).

    Args:
        make: ``alpha -> Solver``, e.g. ``lambda a: make_solver("neumann", 100, alpha=a)``.
        power_iters: products spent on the estimate.

    Raises:
        ValueError: at ``run``, when the estimate is not positive, or the operator is an
            :class:`Operator` not marked symmetric.
    """
    if not callable(make):
        raise TypeError(f"auto_alpha: make must be callable, got {type(make).__name__}")
    power_iters = _check_count("power_iters", power_iters, minimum=1)
    name = _made(make, 1.0).name

    def run(matvec: MatVec, b: Vector) -> tuple[Vector, SolverInfo]:
        if not _symmetric(matvec):
            raise ValueError(
                "auto_alpha: the operator is not symmetric (an Operator with symmetric=False, "
                "such as the system (I - dPhi/dw)^T q = v of a fixed-point map): its eigenvalues "
                "may be complex, and power iteration's estimate bounds no step of a series on "
                "it. Give alpha a number (for a fixed-point map, alpha=1 is the map's own "
                "adjoint iteration q <- (dPhi/dw)^T q + v, which converges where the map "
                "contracts), or use normal_cg."
            )
        lambda_max = float(power_iteration(matvec, b, power_iters))
        if not lambda_max > 0:
            raise ValueError(
                f"auto_alpha: the operator has no positive curvature (power iteration gave "
                f"lambda_max = {lambda_max:.4g}), so no step makes the series converge; as a "
                "Hessian, the LL is not at a minimum. Run more LL steps or add L2 "
                "regularization to the LL objective."
            )
        x, info = _made(make, 1.0 / lambda_max).run(matvec, b)
        return x, replace(info, alpha=1.0 / lambda_max, lambda_max=lambda_max)

    return Solver(name, run)


def _made(make: Callable[[float], Solver], alpha: float) -> Solver:
    """``make(alpha)``, checked to be a :class:`Solver`."""
    solver = make(alpha)
    if not isinstance(solver, Solver):
        raise TypeError(f"auto_alpha: make(alpha) must return a Solver, got {solver!r}")
    return solver

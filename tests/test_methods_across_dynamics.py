"""Every UL method crossed with every LL dynamics, in float64.

Dynamics (columns): plain gradient descent (``gd``), SGD with heavy-ball momentum, SGD with
an L2 ``weight_decay`` in the rule, BDA with ``alpha > 0`` (aggregated steps) and with
``alpha = 0`` (plain gradient descent, bit for bit), and a ``FixedPointMap``
(``w <- Phi(w, lambda)``, a contraction with a non-symmetric Jacobian, no objective and no
learning rate).

Methods (rows): everything ``bilevel.ul`` exports. Each cell either checks the result
against an exact answer, or checks that the pair is refused EARLY (when the
``BilevelProblem`` is built, before any LL step) with a ``ValueError``/``TypeError`` that
names the reason and the cure. References, written here on plain tensors:

- Reverse, Forward, MemorySavingReverse, Truncated(K), PTT: a hand-written unroll of the
  dynamics (the momentum buffer, the weight decay, BDA's ``(1 - a_k) grad f + a_k grad F``
  or ``Phi``), back-propagated by ``torch.autograd`` (Truncated: the run is cut before its
  last K steps; PTT: from the iterate with the largest UL loss);
- Implicit (every solver): the implicit function theorem at the hand run's last iterate
  with a dense solve, ``grad_lam F - d/dlam <g(w, lam), q>``, ``(dg/dw)^T q = grad_w F``,
  where ``g = grad_w f`` for gradient dynamics and ``g = w - Phi(w)`` for a fixed-point map;
- FiniteDifference (one step): Reverse through that step (exact here: the LL objective is
  quadratic in ``w``, where central differences have no truncation error);
- IGA: the rank-one formula at the last iterate; DM: its first multiplier step at the LL
  run's result; FirstOrder: ``grad_lam F`` at the last iterate; Reptile: ``w_0 - w_T``;
  StochasticImplicit (full batch): ``S`` SGD steps on ``q^T H q / 2 - v^T q`` from 0;
- the first-order and stochastic methods (BOME, PBGD, BVFIM, MESO, GAFFO, F2SA, Alternating,
  SOBA, SABA, StocBiO, AmIGO) keep their own LL state and take their own plain SGD steps
  (their updates are checked against hand-written ones in test_first_order_methods.py and
  test_stochastic_methods.py): here, BDA with ``alpha = 0`` must give their GD result bit
  for bit, and every dynamics whose steps they cannot take must be refused.

Found (the cells and tests that fail before the fix in /tmp/audit_dyn/fix.diff): a
FixedPointMap under IGA, DM and every first-order / stochastic method raised the internal
``ll_objective must return a scalar torch.Tensor, but it returned list`` at the first UL
step; BDA with ``alpha > 0`` under the first-order / stochastic methods was silently run as
plain gradient descent (the same hypergradient as ``gd``, bit for bit); Implicit refused
cg / minres on a fixed-point map and a weight-decay rule, and StochasticImplicit a
fixed-point map, only after the LL run; IGA and DM silently used the Hessian/gradient of
``ll_objective`` alone behind an L2 weight decay in the rule; and messages about a
FixedPointMap spoke of an LL learning rate it does not have.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import BDA, FixedPointMap, GradientDescent, rules
from bilevel.ul import (
    BOME,
    BVFIM,
    DM,
    F2SA,
    GAFFO,
    IGA,
    MESO,
    PBGD,
    PTT,
    SABA,
    SOBA,
    Alternating,
    AmIGO,
    FiniteDifference,
    FirstOrder,
    Forward,
    Implicit,
    MemorySavingReverse,
    Reptile,
    Reverse,
    StocBiO,
    StochasticImplicit,
    Truncated,
)

DTYPE = torch.float64
Tensors = list[torch.Tensor]
LR = 0.5
T = 6  # LL steps of the unrolled runs
T_CONVERGED = 120  # LL steps of the runs that Implicit differentiates (contraction ~0.66)
K = 2  # Truncated's window
MOMENTUM = 0.5
WD = 0.1
ALPHA, ALPHA_DECAY = 0.5, 0.8  # BDA
ETA = 0.3  # DM's multiplier step
SOLVER_STEPS = 7  # StochasticImplicit

_g = torch.Generator().manual_seed(3)
X = torch.randn(16, 4, generator=_g, dtype=DTYPE)
Y = torch.randn(16, generator=_g, dtype=DTYPE)
XV = torch.randn(16, 4, generator=_g, dtype=DTYPE)
YV = torch.randn(16, generator=_g, dtype=DTYPE)
W0 = 0.5 * torch.randn(4, generator=_g, dtype=DTYPE)
B0 = torch.tensor(0.1, dtype=DTYPE)
LAM0 = torch.full((4,), 0.5, dtype=DTYPE).log()
_a = torch.randn(4, 4, generator=_g, dtype=DTYPE)
A = 0.6 * _a / torch.linalg.matrix_norm(_a, ord=2)
BL = torch.randn(4, 4, generator=_g, dtype=DTYPE)
U = torch.randn(4, generator=_g, dtype=DTYPE)
V = 0.3 * torch.randn(4, generator=_g, dtype=DTYPE)
TRAIN, VAL = (X, Y), (XV, YV)


# ----------------------------------------------------------------- models and objectives


class Net(nn.Module):
    """The LL model ``x @ w + b``: a vector and a 0-d scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(W0.clone())
        self.b = nn.Parameter(B0.clone())


class Hyper(nn.Module):
    """The UL model: per-feature log L2 strengths."""

    def __init__(self) -> None:
        super().__init__()
        self.lam = nn.Parameter(LAM0.clone())


def f_hand(W: Tensors, lam: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x @ W[0] + W[1] - y) ** 2).mean() + 0.5 * (lam.exp() * W[0] ** 2).sum()


def F_hand(W: Tensors, lam: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x @ W[0] + W[1] - y) ** 2).mean() + 0.05 * (lam.exp() * W[0] ** 2).sum()


def phi_hand(W: Tensors, lam: torch.Tensor) -> Tensors:
    """A contraction (``||A|| = 0.6``, slopes below 0.5) with a non-symmetric Jacobian."""
    a, bl, u, v = (t.to(W[0].device) for t in (A, BL, U, V))
    return [0.5 * torch.tanh(a @ W[0] + bl @ lam + W[1] * u), 0.5 * torch.tanh(v @ W[0] + 0.3)]


def lam_of(state: dict) -> torch.Tensor:
    """The UL variable, or a constant where the UL model is the LL's initialization."""
    ul = state["ul_model"]
    return ul.lam if isinstance(ul, Hyper) else LAM0.to(state["ll_model"].w.device)


def ll_objective(state: dict) -> torch.Tensor:
    m = state["ll_model"]
    return f_hand([m.w, m.b], lam_of(state), state["data"], state["target"])


def ul_objective(state: dict) -> torch.Tensor:
    m = state["ll_model"]
    return F_hand([m.w, m.b], lam_of(state), state["data"], state["target"])


def fixed_point_map(state: dict) -> Tensors:
    m = state["ll_model"]
    return phi_hand([m.w, m.b], lam_of(state))


# ------------------------------------------------------------------------------ dynamics

DYNAMICS = ["gd", "momentum", "weight_decay", "bda", "bda0", "fixed_point"]


def make_ll(dynamics: str, net: nn.Module, ul: nn.Module, iters: int):
    if dynamics == "fixed_point":
        return FixedPointMap(fixed_point_map, net, ul, iters=iters)
    if dynamics in ("bda", "bda0"):
        alpha = ALPHA if dynamics == "bda" else 0.0
        return BDA(
            ll_objective,
            net,
            ul,
            LR,
            iters,
            ul_objective=ul_objective,
            alpha=alpha,
            alpha_decay=ALPHA_DECAY,
        )
    options = {
        "momentum": {"momentum": MOMENTUM},
        "weight_decay": {"optimizer": rules.sgd(weight_decay=WD)},
    }.get(dynamics, {})
    return GradientDescent(ll_objective, net, ul, LR, iters, **options)


def hand_step(dynamics: str, W: Tensors, buf: Tensors | None, lam: torch.Tensor, t: int):
    """One step of the dynamics on plain tensors, with its graph: ``(W, momentum buffer)``."""
    if dynamics == "fixed_point":
        return phi_hand(W, lam), buf
    g = list(torch.autograd.grad(f_hand(W, lam, X, Y), W, create_graph=True))
    if dynamics == "bda":
        a = ALPHA * ALPHA_DECAY**t
        gF = torch.autograd.grad(F_hand(W, lam, XV, YV), W, create_graph=True)
        g = [(1 - a) * gi + a * gFi for gi, gFi in zip(g, gF, strict=True)]
    if dynamics == "weight_decay":
        g = [gi + WD * wi for gi, wi in zip(g, W, strict=True)]
    if dynamics == "momentum":
        buf = g if buf is None else [MOMENTUM * b + gi for b, gi in zip(buf, g, strict=True)]
        g = buf
    return [w - LR * gi for w, gi in zip(W, g, strict=True)], buf


def hand_run(dynamics: str, W: Tensors, lam: torch.Tensor, steps: int, cut: int = 0) -> list:
    """The iterates ``W_0 .. W_steps``; the weights (and buffer) entering step ``cut`` are
    constants (the steps before it keep no graph)."""
    iterates, buf = [W], None
    for t in range(steps):
        if t == cut and cut > 0:
            W = [w.detach().requires_grad_() for w in W]
            buf = None if buf is None else [b.detach() for b in buf]
        W, buf = hand_step(dynamics, W, buf, lam, t)
        iterates.append(W)
    return iterates


# ------------------------------------------------------------------- hand-written references


def grads(value: torch.Tensor, inputs: Tensors, **kwargs) -> Tensors:
    out = torch.autograd.grad(value, inputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, out, strict=True)]


def flat(tensors: Tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def split(x: torch.Tensor) -> Tensors:
    return [x[:4], x[4]]


class Start:
    """The UL leaves and the LL start: ``lam`` and constant weights (``hyper``), or the
    initial weights themselves (``init``, with the constant ``LAM0``)."""

    def __init__(self, structure: str) -> None:
        if structure == "hyper":
            self.lam = LAM0.clone().requires_grad_()
            self.U = [self.lam]
            self.W = [W0.clone().requires_grad_(), B0.clone().requires_grad_()]
        else:
            self.lam = LAM0
            self.U = [W0.clone().requires_grad_(), B0.clone().requires_grad_()]
            self.W = self.U


def last_weights(dynamics: str, start: Start, steps: int) -> Tensors:
    W = hand_run(dynamics, start.W, start.lam, steps)[-1]
    return [w.detach().requires_grad_() for w in W]


def ref_reverse(dynamics: str, structure: str) -> Tensors:
    s = Start(structure)
    W = hand_run(dynamics, s.W, s.lam, T)[-1]
    return grads(F_hand(W, s.lam, XV, YV), s.U)


def ref_truncated(dynamics: str, structure: str) -> Tensors:
    s = Start(structure)
    W = hand_run(dynamics, s.W, s.lam, T, cut=T - K)[-1]
    return grads(F_hand(W, s.lam, XV, YV), s.U)


def ref_ptt(dynamics: str, structure: str) -> Tensors:
    s = Start(structure)
    iterates = hand_run(dynamics, s.W, s.lam, T)[1:]
    losses = torch.stack([F_hand(W, s.lam, XV, YV).detach() for W in iterates])
    worst = int(losses.argmax())
    return grads(F_hand(iterates[worst], s.lam, XV, YV), s.U)


def residual(dynamics: str, W: Tensors, lam: torch.Tensor) -> torch.Tensor:
    """``g(w, lam)``, flat, with its graph: the LL gradient, or ``w - Phi(w)``."""
    if dynamics == "fixed_point":
        return flat(W) - flat(phi_hand(W, lam))
    return flat(torch.autograd.grad(f_hand(W, lam, X, Y), W, create_graph=True))


def jacobian(g: torch.Tensor, W: Tensors) -> torch.Tensor:
    rows = [flat(grads(g[i], W, retain_graph=True)) for i in range(len(g))]
    return torch.stack(rows)


def ref_implicit_at(dynamics: str, steps: int, solve: Callable) -> Tensors:
    """``grad_lam F - d/dlam <g, q>`` at the hand run's last iterate, ``q = solve(J, v)``
    with ``J = dg/dw``, ``v = grad_w F``."""
    s = Start("hyper")
    W = last_weights(dynamics, s, steps)
    loss = F_hand(W, s.lam, XV, YV)
    direct = grads(loss, s.U, retain_graph=True)
    v = flat(grads(loss, W))
    g = residual(dynamics, W, s.lam)
    q = solve(jacobian(g, W), v)
    cross = grads(g @ q, s.U)
    return [d - c for d, c in zip(direct, cross, strict=True)]


def ref_implicit(dynamics: str, structure: str) -> Tensors:
    return ref_implicit_at(dynamics, T_CONVERGED, lambda J, v: torch.linalg.solve(J.T, v))


def ref_stochastic_implicit(dynamics: str, structure: str) -> Tensors:
    """Full batch: ``SOLVER_STEPS`` SGD steps (step ``LR``) on ``q^T H q / 2 - v^T q``."""

    def sgd(H: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = torch.zeros_like(v)
        for _ in range(SOLVER_STEPS):
            q = q - LR * (H @ q - v)
        return q

    return ref_implicit_at(dynamics, T, sgd)


def ref_finite_difference(dynamics: str, structure: str) -> Tensors:
    s = Start(structure)
    W = hand_run(dynamics, s.W, s.lam, 1)[-1]
    return grads(F_hand(W, s.lam, XV, YV), s.U)


def ref_iga(dynamics: str, structure: str) -> Tensors:
    s = Start("hyper")
    W = last_weights(dynamics, s, T)
    Fw = flat(grads(F_hand(W, s.lam, XV, YV), W))
    fw = flat(grads(f_hand(W, s.lam, X, Y), W))
    c = (Fw @ fw) / (fw @ fw)
    Flam = grads(F_hand(W, s.lam, XV, YV), s.U)
    flam = grads(f_hand(W, s.lam, X, Y), s.U)
    return [a - c * b for a, b in zip(Flam, flam, strict=True)]


def ref_dm(dynamics: str, structure: str) -> Tensors:
    """The first UL step: ``z_1 = eta grad_w F`` (from ``z_0 = 0``), direction
    ``grad_lam F - d/dlam <grad_w f, z_1>`` at the LL run's result."""
    s = Start("hyper")
    W = last_weights(dynamics, s, 3)
    loss = F_hand(W, s.lam, XV, YV)
    direct = grads(loss, s.U, retain_graph=True)
    z = ETA * flat(grads(loss, W))
    cross = grads(residual(dynamics, W, s.lam) @ z, s.U)
    return [d - c for d, c in zip(direct, cross, strict=True)]


def ref_first_order(dynamics: str, structure: str) -> Tensors:
    s = Start("hyper")
    W = last_weights(dynamics, s, T)
    return grads(F_hand(W, s.lam, XV, YV), s.U)


def ref_reptile(dynamics: str, structure: str) -> Tensors:
    s = Start("init")
    W = hand_run(dynamics, s.W, s.lam, T)[-1]
    return [(w0 - w).detach() for w0, w in zip(s.W, W, strict=True)]


# ------------------------------------------------------------------------------- the matrix


class Method:
    """A row: how to build the method, its LL run length, its structure (``hyper``: the UL
    variable is ``lam``; ``init``: the UL model is the LL model), and its reference."""

    def __init__(
        self,
        build: Callable,
        iters: int = T,
        reference: Callable | None = None,
        structure: str = "hyper",
        own_state: bool = False,
    ) -> None:
        self.build = build
        self.iters = iters
        self.reference = reference
        self.structure = structure
        self.own_state = own_state  # keeps its own LL state, takes its own plain SGD steps


def implicit(method: str, k: int) -> Callable:
    return lambda *a: Implicit(*a, method=method, k=k, tolerance=1e-14)


METHODS = {
    "Reverse": Method(Reverse, reference=ref_reverse),
    "Truncated": Method(lambda *a: Truncated(*a, truncate_iter=K), reference=ref_truncated),
    "Forward": Method(Forward, reference=ref_reverse),
    "MemorySavingReverse": Method(MemorySavingReverse, reference=ref_reverse),
    "PTT": Method(PTT, reference=ref_ptt),
    "Implicit-cg": Method(implicit("cg", 50), T_CONVERGED, ref_implicit),
    "Implicit-minres": Method(implicit("minres", 50), T_CONVERGED, ref_implicit),
    "Implicit-normal_cg": Method(implicit("normal_cg", 50), T_CONVERGED, ref_implicit),
    "Implicit-neumann": Method(implicit("neumann", 200), T_CONVERGED, ref_implicit),
    "Implicit-fixed_point": Method(implicit("fixed_point", 200), T_CONVERGED, ref_implicit),
    "FiniteDifference": Method(FiniteDifference, 1, ref_finite_difference),
    "IGA": Method(lambda *a: IGA(*a, converged_warning=None), reference=ref_iga),
    "DM": Method(lambda *a: DM(*a, eta=ETA), 3, ref_dm),
    "FirstOrder": Method(FirstOrder, reference=ref_first_order),
    "Reptile": Method(Reptile, reference=ref_reptile, structure="init"),
    "StochasticImplicit": Method(
        lambda *a: StochasticImplicit(*a, steps=SOLVER_STEPS, batches=None, cross="full"),
        reference=ref_stochastic_implicit,
    ),
    **{
        name: Method(cls, 3, own_state=True)
        for name, cls in [
            ("BOME", BOME),
            ("PBGD", PBGD),
            ("BVFIM", BVFIM),
            ("MESO", MESO),
            ("GAFFO", GAFFO),
            ("F2SA", F2SA),
        ]
    },
    "Alternating": Method(Alternating, 3, own_state=True),
    "SOBA": Method(lambda *a: SOBA(*a, batch_size=None), 1, own_state=True),
    "SABA": Method(lambda *a: SABA(*a, batch_size=None), 1, own_state=True),
    "StocBiO": Method(lambda *a: StocBiO(*a, batch_size=None), 3, own_state=True),
    "AmIGO": Method(lambda *a: AmIGO(*a, batch_size=None), 3, own_state=True),
}

# refusals: the reason and the cure, as regular expressions on the message
FIXED_POINT_REFUSED = r"(?s)(FixedPointMap|fixed-point map).*(Reverse|Implicit\(method=)"
PLAIN_STEPS_REFUSED = r"plain (gradient descent|SGD)"
BDA_IGNORED = r"(?s)BDA.*alpha.*GradientDescent"
DECAY_REFUSED = r"(?s)weight_decay.*ll_objective"
NOT_STATIONARY = r"(?s)stationary point of ll_objective.*Reverse"
NOT_SYMMETRIC = r"(?s)not symmetric.*normal_cg"
FD_REFUSED = r"(?s)one plain gradient step.*Reverse"

REFUSED: dict[tuple[str, str], str] = {}
for _name in [n for n in METHODS if n.startswith("Implicit")] + ["StochasticImplicit"]:
    REFUSED[_name, "weight_decay"] = DECAY_REFUSED
    REFUSED[_name, "bda"] = NOT_STATIONARY
for _name in ("Implicit-cg", "Implicit-minres"):
    REFUSED[_name, "fixed_point"] = NOT_SYMMETRIC
REFUSED["StochasticImplicit", "fixed_point"] = FIXED_POINT_REFUSED
# BDA with alpha = 0 is plain gradient descent: FiniteDifference takes it (it refused it
# with a wrong reason, "not a plain gradient step")
for _dynamics in ("momentum", "weight_decay", "bda", "fixed_point"):
    REFUSED["FiniteDifference", _dynamics] = FD_REFUSED
for _name in ("IGA", "DM"):
    REFUSED[_name, "weight_decay"] = DECAY_REFUSED
    REFUSED[_name, "fixed_point"] = FIXED_POINT_REFUSED
for _name, _method in METHODS.items():
    if _method.own_state:
        REFUSED[_name, "momentum"] = PLAIN_STEPS_REFUSED
        REFUSED[_name, "weight_decay"] = PLAIN_STEPS_REFUSED
        REFUSED[_name, "bda"] = BDA_IGNORED
        REFUSED[_name, "fixed_point"] = FIXED_POINT_REFUSED

CELLS = [(m, d) for m in METHODS for d in DYNAMICS]


def build(name: str, dynamics: str, iters: int | None = None, device: str = "cpu"):
    method = METHODS[name]
    net = Net().to(device)
    ul = net if method.structure == "init" else Hyper().to(device)
    ll = make_ll(dynamics, net, ul, method.iters if iters is None else iters)
    objective = fixed_point_map if dynamics == "fixed_point" else ll_objective
    return ll, method.build(ul_objective, ul, objective, net)


def hypergradient(name: str, dynamics: str, device: str = "cpu") -> Tensors:
    ll, ul = build(name, dynamics, device=device)
    train, val = (tuple(t.to(device) for t in pair) for pair in (TRAIN, VAL))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at these settings
        return BilevelProblem(ll, ul).hypergradient(train, val)


def close(got: Tensors, expected: Tensors, rtol: float) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


@pytest.mark.parametrize(("method", "dynamics"), CELLS, ids=[f"{m}-{d}" for m, d in CELLS])
def test_each_method_with_each_dynamics_is_exact_or_refused_early(method, dynamics):
    pattern = REFUSED.get((method, dynamics))
    if pattern is not None:  # refused when the problem is built, before any LL step
        with pytest.raises((ValueError, TypeError), match=pattern):
            ll, ul = build(method, dynamics)
            BilevelProblem(ll, ul)
        return
    got = hypergradient(method, dynamics)
    row = METHODS[method]
    if row.own_state:
        assert all(bool(torch.isfinite(g).all()) for g in got)
        if dynamics == "bda0":  # BDA(alpha=0) is gradient descent, bit for bit
            expected = hypergradient(method, "gd")
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        return
    expected = row.reference(dynamics, row.structure)
    assert max(float(e.abs().max()) for e in expected) > 1e-4  # not a trivial zero
    close(got, expected, rtol=1e-9)


# ------------------------------------------------------- the evidence behind some refusals


def test_own_state_methods_ran_bda_as_plain_gradient_descent():
    """The evidence for the ``bda`` refusals of the first-order / stochastic methods: where
    they accept ``BDA(alpha=0.5)`` they return the hypergradient of plain gradient descent
    bit for bit (BDA's aggregation is never applied), which the runner must not allow."""
    for name in [n for n, m in METHODS.items() if m.own_state]:
        ll, ul = build(name, "bda")
        try:
            got = BilevelProblem(ll, ul).hypergradient(TRAIN, VAL)
        except ValueError as error:
            assert re.search(BDA_IGNORED, str(error)), str(error)
            continue
        same = all(torch.equal(a, b) for a, b in zip(got, hypergradient(name, "gd"), strict=True))
        assert not same, f"{name} ran BDA(alpha={ALPHA}) as plain gradient descent"


def exact_with_decay() -> Tensors:
    """The implicit hypergradient of the problem an LL with ``weight_decay`` solves,
    ``f + (WD / 2) ||w||^2`` (both LL tensors), at its minimizer (dense)."""
    s = Start("hyper")
    W = [w.detach().clone().requires_grad_() for w in s.W]
    for _ in range(300):  # the contraction of gradient descent: ~0.66 per step
        g = grads(f_hand(W, s.lam, X, Y) + 0.5 * WD * sum((w * w).sum() for w in W), W)
        W = [(w - LR * gi).detach().requires_grad_() for w, gi in zip(W, g, strict=True)]
    loss = F_hand(W, s.lam, XV, YV)
    direct = grads(loss, s.U, retain_graph=True)
    v = flat(grads(loss, W))
    decayed = f_hand(W, s.lam, X, Y) + 0.5 * WD * sum((w * w).sum() for w in W)
    g = flat(torch.autograd.grad(decayed, W, create_graph=True))
    q = torch.linalg.solve(jacobian(g, W), v)
    return [d - c for d, c in zip(direct, grads(g @ q, s.U), strict=True)]


def decayed_ll_objective(state: dict) -> torch.Tensor:
    m = state["ll_model"]
    return ll_objective(state) + 0.5 * WD * ((m.w * m.w).sum() + m.b * m.b)


@pytest.mark.parametrize("spelling", ["in_ll_objective", "in_the_rule"])
def test_dm_at_its_fixed_point_is_the_implicit_hypergradient_of_the_decayed_problem(spelling):
    """DM's fixed point is the implicit hypergradient of the problem the LL solves. With the
    L2 penalty written in ``ll_objective`` it is (to round-off). FOUND: with the same penalty
    as ``weight_decay`` in the rule, the LL converges to the same weights, but DM's
    multiplier solves with the Hessian of ``ll_objective`` alone and its direction settles
    13% (in norm) away from the exact value, without a warning; it must be refused (as Implicit
    and StochasticImplicit refuse it) or be right."""
    net, ul = Net(), Hyper()
    if spelling == "in_ll_objective":
        objective = decayed_ll_objective
        ll = GradientDescent(objective, net, ul, LR, 3)
    else:
        objective = ll_objective
        ll = GradientDescent(objective, net, ul, LR, 3, optimizer=rules.sgd(weight_decay=WD))
    dm = DM(ul_objective, ul, objective, net, eta=LR)
    try:
        problem = BilevelProblem(ll, dm, torch.optim.SGD(ul.parameters(), lr=0.0))
    except ValueError as error:
        assert spelling == "in_the_rule" and re.search(DECAY_REFUSED, str(error))
        return
    for _ in range(90):  # y and z contract by ~0.66 per UL step
        problem.step(TRAIN, VAL)
    close([ul.lam.grad], exact_with_decay(), rtol=1e-9)


def test_iga_does_not_depend_on_where_the_l2_penalty_is_written():
    """The same LL run (penalty in ``ll_objective``, or as ``weight_decay`` in the rule: the
    iterates agree to round-off) must give the same IGA estimate, or be refused. FOUND: the
    rule spelling takes ``c = <grad_w F, grad_w f> / ||grad_w f||^2`` with the gradient of
    ``ll_objective`` without the decay, which the LL does not descend: 29% (in norm) off."""
    net, ul = Net(), Hyper()
    ll = GradientDescent(decayed_ll_objective, net, ul, LR, T)
    iga = IGA(ul_objective, ul, decayed_ll_objective, net, converged_warning=None)
    expected = BilevelProblem(ll, iga).hypergradient(TRAIN, VAL)
    ll = GradientDescent(ll_objective, net, ul, LR, T, optimizer=rules.sgd(weight_decay=WD))
    iga = IGA(ul_objective, ul, ll_objective, net, converged_warning=None)
    try:
        problem = BilevelProblem(ll, iga)
    except ValueError as error:
        assert re.search(DECAY_REFUSED, str(error))
        return
    close(problem.hypergradient(TRAIN, VAL), expected, rtol=1e-9)


# ------------------------------------------------ messages about a FixedPointMap's "LL rate"

LEARNING_RATE = re.compile(r"learning rate|\blr\b|lambda_max|LL gradient")


def test_implicit_stationarity_warning_on_a_fixed_point_map_gives_advice_that_fits():
    """FOUND: a fixed-point LL stopped after one iteration (its residual ``||w - Phi(w)||``
    at 13% of the first) warned "The LL gradient at the auxiliary model is 13% ... lower
    the LL learning rate if the LL oscillates (it must stay below 2 / lambda_max)": a
    FixedPointMap has neither an LL gradient nor a learning rate. The warning must stay,
    with advice that fits (more iterations; a map that contracts; Reverse)."""
    ll, ul = build("Implicit-fixed_point", "fixed_point", iters=1)
    with pytest.warns(RuntimeWarning, match="not stationary") as caught:
        BilevelProblem(ll, ul).hypergradient(TRAIN, VAL)
    message = " ".join(str(w.message) for w in caught)
    assert not LEARNING_RATE.search(message), message
    assert re.search(r"iterations", message), message


def test_a_nan_in_a_fixed_point_map_names_no_learning_rate():
    """FOUND: "The LL loss became nan at LL step 0 of 3 (lr=1). Lower the LL learning rate,
    ..." for a FixedPointMap, which has no learning rate to lower."""
    net, ul = Net(), Hyper()
    ll = FixedPointMap(lambda s: [s["ll_model"].w * math.nan, s["ll_model"].b], net, ul, 3)
    with pytest.raises(FloatingPointError, match="nan") as raised:
        ll.run(*TRAIN)
    assert not LEARNING_RATE.search(str(raised.value)), str(raised.value)


def test_a_growing_fixed_point_iteration_names_no_learning_rate():
    """FOUND: "The LL loss grew from 2.5 to 40 (x16) over 3 LL steps (lr=1, rule sgd) ...":
    the advice that follows is the map's, but the settings it quotes are a gradient
    descent's that the user never gave."""
    net, ul = Net(), Hyper()
    expanding = lambda s: [2 * s["ll_model"].w + 1, s["ll_model"].b]  # noqa: E731
    ll = FixedPointMap(expanding, net, ul, 3)
    with pytest.raises(FloatingPointError, match="not a contraction") as raised:
        ll.run(*TRAIN)
    assert not re.search(r"\blr=|rule sgd", str(raised.value)), str(raised.value)


def test_implicit_ll_learning_rate_on_a_fixed_point_map_points_to_alpha():
    """FOUND: ``Implicit(ll_learning_rate=0.5)`` with a FixedPointMap was refused because it
    "disagrees with the LL optimizer's lr=1": the map has no learning rate (1 is the
    series' default step). The cure that fits is ``alpha``."""
    net, ul = Net(), Hyper()
    ll = FixedPointMap(fixed_point_map, net, ul, 20)
    implicit = Implicit(
        ul_objective, ul, fixed_point_map, net, ll_learning_rate=0.5, method="fixed_point"
    )
    with pytest.raises(ValueError, match=r"alpha") as raised:
        BilevelProblem(ll, implicit)
    assert not re.search(r"\blr=", str(raised.value)), str(raised.value)

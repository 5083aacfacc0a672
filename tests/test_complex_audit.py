"""Complex parameters and data (complex128) across every method and LL dynamics.

The problem: a complex ridge LL ``0.5 mean|A w - b|^2 + 0.5 sum(exp(Re lam) |w - lam|^2)``
whose UL variable ``lam`` is used whole (its real part scales the penalty, the whole of it
centres it), and a UL objective ``0.5 mean|A_v w - b_v|^2 + 0.01 |lam|^2``. torch's gradient
of a real loss in a complex tensor is ``dL/dRe + i dL/dIm`` (what makes ``w - lr grad`` a
descent step), so the exact hypergradient is ``torch.autograd.grad`` of ``F(lam)`` written
with a dense solve for ``w*(lam)``; the methods that approximate it (or keep LL state) must
give what they give on the real embedding of the same problem: ``Re``/``Im`` parts as real
parameters and data (``torch.view_as_real``), read back as complex in the objectives.

Found before the fix (measured on this problem): every method raised a ``TypeError`` in the
finiteness check of the hypergradient (``math.isfinite`` of a complex sum). Behind it: CG,
MINRES, normal-equation CG, ``alpha="auto"``, IGA, DM and BOME raised raw torch errors (the
inner product ``vdot`` is complex: ``gt_cpu``/``clamp`` not implemented); PBGD's gradient
penalty, BVFIM's terms and a fixed-point map's LL loss were complex "losses" (raw errors);
MESO's and GAFFO's gaps complex; Forward was 33% off silently (one complex tangent per entry:
the derivative along the real parts alone); Adam, AdamW, RMSprop and Adagrad raised raw errors
(``g * g`` of a complex ``g``), MemorySavingReverse with momentum raised one; the runner cast
the losses to the models' complex dtype (StocBiO's with a warning that it dropped a part); a
complex step size was used silently (its imaginary part turns the step) while a real tensor
one was refused; complex data of another precision met a raw matmul error; a
torch.distributed run failed on complex fault flags; an online RTHO run refused its own
checkpoint. Now every method gives the dense answer or its real embedding's to round-off (at
most 6e-15 relative here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import join_group
from torch import nn

from bilevel import BilevelProblem, checkpoint, distributed, linalg
from bilevel import ul as U
from bilevel.ll import BDA, FixedPointMap, GradientDescent
from bilevel.ll.rules import make_rule
from bilevel.online import OnlineHypergradient
from bilevel.state import check_hypergradient

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # stationarity notes
    pytest.mark.filterwarnings("error:Casting complex values to real:UserWarning"),
]

CX = torch.complex128
N, D = 30, 4
EXACT = 1e-10  # relative error to the dense closed form (measured: at most 5e-16)
SAME = 1e-11  # relative error to the real embedding (measured: at most 6e-15)

_g = torch.Generator().manual_seed(0)
A, B, A_VAL, B_VAL = (
    torch.randn(*shape, dtype=CX, generator=_g) for shape in ((N, D), (N,), (N, D), (N,))
)
LAM0 = 0.3 * torch.randn(D, dtype=CX, generator=_g)
W0 = 0.1 * torch.randn(D, dtype=CX, generator=_g)


def as_complex(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor, or the real embedding of one (a last dimension of 2) read as complex."""
    return t if t.is_complex() else torch.view_as_complex(t)


def embedded(t: torch.Tensor, real: bool) -> torch.Tensor:
    return torch.view_as_real(t).contiguous() if real else t


def squared(r: torch.Tensor) -> torch.Tensor:
    """``|r|^2``, with second derivatives everywhere (``r.abs()**2`` has none at 0)."""
    return r.real**2 + r.imag**2


class Params(nn.Module):
    def __init__(self, **tensors: torch.Tensor) -> None:
        super().__init__()
        for name, t in tensors.items():
            setattr(self, name, nn.Parameter(t.clone()))


def residual(state: dict) -> torch.Tensor:
    w = as_complex(state["ll_model"].w)
    return as_complex(state["data"]) @ w - as_complex(state["target"])


def ll_objective(state: dict) -> torch.Tensor:
    w, lam = as_complex(state["ll_model"].w), as_complex(state["ul_model"].lam)
    penalty = 0.5 * (lam.real.exp() * squared(w - lam)).sum()
    return 0.5 * squared(residual(state)).mean() + penalty


def ul_objective(state: dict) -> torch.Tensor:
    lam = as_complex(state["ul_model"].lam)
    return 0.5 * squared(residual(state)).mean() + 1e-2 * squared(lam).sum()


def fixed_point_map(state: dict) -> list[torch.Tensor]:
    """A gradient step on the LL plus a skew term: a contraction that is no gradient step."""
    w, lam = as_complex(state["ll_model"].w), as_complex(state["ul_model"].lam)
    x, y = as_complex(state["data"]), as_complex(state["target"])
    grad = x.conj().T @ (x @ w - y) / len(x) + lam.real.exp() * (w - lam)
    new = w - 0.5 * grad + 0.02j * (torch.roll(w, 1) - torch.roll(w, -1))
    return [embedded(new, not state["ll_model"].w.is_complex())]


def exact_hypergradient() -> torch.Tensor:
    """``dF/dlam`` by autograd through the dense solution of the LL's stationarity
    ``(A^H A / n + diag(s)) w = A^H b / n + s lam``, ``s = exp(Re lam)``."""
    lam = LAM0.clone().requires_grad_()
    s = lam.real.exp()
    hessian = A.conj().T @ A / N + torch.diag(s.to(CX))
    w = torch.linalg.solve(hessian, A.conj().T @ B / N + s * lam)
    loss = 0.5 * squared(A_VAL @ w - B_VAL).mean() + 1e-2 * squared(lam).sum()
    return torch.autograd.grad(loss, lam)[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


#: LL dynamics: GradientDescent's update rules (with their options), BDA, a fixed-point map
RULES = {
    "sgd": {"lr": 0.5},
    "momentum": {"lr": 0.25, "momentum": 0.5},
    "nesterov": {"lr": 0.25, "optimizer": "nesterov", "momentum": 0.5},
    **{name: {"lr": 0.05, "optimizer": name} for name in ("adam", "adamw", "rmsprop", "adagrad")},
}
DYNAMICS = [*RULES, "bda", "fixed_point_map"]


def lower_level(dynamics: str, ll_model: nn.Module, ul_model: nn.Module, iters: int) -> Any:
    if dynamics == "bda":
        bda = {"ul_objective": ul_objective, "alpha": 0.5, "alpha_decay": 0.9}
        return BDA(ll_objective, ll_model, ul_model, 0.5, iters, **bda)
    if dynamics == "fixed_point_map":
        return FixedPointMap(fixed_point_map, ll_model, ul_model, iters=iters)
    return GradientDescent(ll_objective, ll_model, ul_model, iters=iters, **RULES[dynamics])


def build(
    method: Callable[..., Any], real: bool = False, iters: int = 300, dynamics: str = "sgd"
) -> tuple[BilevelProblem, nn.Module, tuple, tuple]:
    """The problem driven by ``method`` (complex, or its real embedding), UL SGD at 0.1."""
    ll_model, ul_model = Params(w=embedded(W0, real)), Params(lam=embedded(LAM0, real))
    ll = lower_level(dynamics, ll_model, ul_model, iters)
    f = fixed_point_map if dynamics == "fixed_point_map" else ll_objective
    ul = method(ul_objective, ul_model, f, ll_model)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=0.1))
    train = (embedded(A, real), embedded(B, real))
    val = (embedded(A_VAL, real), embedded(B_VAL, real))
    return problem, ul_model, train, val


def hypergradient(method: Callable[..., Any], real: bool = False, **options: Any) -> torch.Tensor:
    problem, _, train, val = build(method, real, **options)
    (grad,) = problem.hypergradient(train, val)
    return as_complex(grad)


def _with(cls: Any, **options: Any) -> Callable[..., Any]:
    return lambda *args: cls(*args, **options)


def _implicit(method: str, k: int, **options: Any) -> Callable[..., Any]:
    return _with(U.Implicit, ll_learning_rate=0.5, k=k, tolerance=1e-12, method=method, **options)


def ll_outputs(state: dict) -> tuple:
    """The Gauss-Newton split of ``ll_objective``: outputs, their loss, the penalty."""
    w, lam = as_complex(state["ll_model"].w), as_complex(state["ul_model"].lam)
    y = as_complex(state["target"])
    rest = 0.5 * (lam.real.exp() * squared(w - lam)).sum()
    return as_complex(state["data"]) @ w, lambda z: 0.5 * squared(z - y).mean(), rest


# --- the methods that are exact at a converged LL --------------------------------------------

EXACT_METHODS = {
    "Reverse": U.Reverse,
    "Truncated": _with(U.Truncated, truncate_iter=300),
    "MemorySavingReverse": U.MemorySavingReverse,
    "Forward": U.Forward,
    "PTT": U.PTT,
    "Implicit-cg": _implicit("cg", 50),
    "Implicit-minres": _implicit("minres", 50),
    "Implicit-normal_cg": _implicit("normal_cg", 100),
    "Implicit-neumann": _implicit("neumann", 300),
    "Implicit-fixed_point": _implicit("fixed_point", 300),
    "Implicit-auto": _with(U.Implicit, k=300, tolerance=1e-12, method="neumann", alpha="auto"),
    "StochasticImplicit": _with(U.StochasticImplicit, steps=200, batches=None, cross="full"),
    "StochasticImplicit-gauss_newton": _with(
        U.StochasticImplicit,
        steps=200,
        batches=None,
        cross="full",
        curvature="gauss_newton",
        ll_outputs=ll_outputs,
    ),
}


@pytest.mark.parametrize("name", EXACT_METHODS)
def test_exact_methods_give_the_dense_hypergradient_of_a_complex_variable(name):
    """Both parts of ``lam`` matter here (the exact answer has real and imaginary parts of
    the same size): one that dropped a part, or conjugated wrongly, is far off."""
    exact = exact_hypergradient()
    assert exact.real.abs().min() > 1e-4 and exact.imag.abs().min() > 1e-4
    assert relative(hypergradient(EXACT_METHODS[name]), exact) < EXACT


# --- approximations and methods with LL state: their real embedding -------------------------

STEPPED = {
    "FiniteDifference": (U.FiniteDifference, 300),
    "FirstOrder": (U.FirstOrder, 300),
    "IGA": (U.IGA, 3),
    "Truncated-5": (_with(U.Truncated, truncate_iter=5), 300),
    "DM": (U.DM, 3),
    "DM-eta": (_with(U.DM, eta=0.5), 3),
    "BOME": (U.BOME, 3),
    "BOME-value": (_with(U.BOME, phi="value"), 3),
    "PBGD": (U.PBGD, 3),
    "PBGD-gradient": (_with(U.PBGD, penalty="gradient"), 3),
    "BVFIM": (U.BVFIM, 3),
    "MESO": (U.MESO, 3),
    "GAFFO": (U.GAFFO, 3),
    "GAFFO-constraints": (
        _with(U.GAFFO, ll_constraints=lambda s: as_complex(s["ll_model"].w).real - 0.05),
        3,
    ),
    "F2SA": (U.F2SA, 3),
    "Alternating": (U.Alternating, 3),
    "SOBA": (_with(U.SOBA, batch_size=10), 1),
    "SABA": (_with(U.SABA, batch_size=None), 1),
    "StocBiO": (_with(U.StocBiO, batch_size=10), 3),
    "AmIGO": (_with(U.AmIGO, batch_size=None), 3),
    "StochasticImplicit-minibatch": (_with(U.StochasticImplicit, steps=20, batches=10), 50),
}


def three_steps(method: Callable[..., Any], real: bool, iters: int) -> tuple[torch.Tensor, dict]:
    """``lam`` after three UL steps, then the three UL losses (as complex numbers); and the
    method's diagnostics that are tensors (gaps, multipliers, norms)."""
    problem, ul_model, train, val = build(method, real, iters)
    losses = [problem.step(train, val) for _ in range(3)]
    for loss in (*losses, problem.last_ll_loss):
        assert loss.dtype == torch.float64  # a real loss, also for complex models
    diagnostics = {k: v for k, v in problem.ul.diagnostics.items() if isinstance(v, torch.Tensor)}
    return torch.cat([as_complex(ul_model.lam.detach()), torch.stack(losses).to(CX)]), diagnostics


@pytest.mark.parametrize("name", STEPPED)
def test_approximate_and_single_loop_methods_match_their_real_embedding(name):
    """The UL variables, the losses and the method's diagnostics (real numbers: MESO's gap
    was complex) after three UL steps are those of the real embedding."""
    method, iters = STEPPED[name]
    (ours, ours_diagnostics), (embedding, diagnostics) = (
        three_steps(method, False, iters),
        three_steps(method, True, iters),
    )
    assert relative(ours, embedding) < SAME
    assert (ours[:D] != LAM0).all()  # the steps moved both parts
    assert ours_diagnostics.keys() == diagnostics.keys()
    for key, value in diagnostics.items():
        torch.testing.assert_close(ours_diagnostics[key], value, rtol=1e-10, atol=1e-12)


# --- LL dynamics ------------------------------------------------------------------------------

THROUGH_STEPS = {"Reverse": U.Reverse, "Forward": U.Forward, "MSR": U.MemorySavingReverse}


@pytest.mark.parametrize("method", THROUGH_STEPS)
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_every_ll_dynamics_differentiates_complex_weights_as_their_real_embedding(dynamics, method):
    make = THROUGH_STEPS[method]
    ours = hypergradient(make, iters=30, dynamics=dynamics)
    embedding = hypergradient(make, True, iters=30, dynamics=dynamics)
    assert relative(ours, embedding) < SAME


TORCH_RULES = {
    "sgd": torch.optim.SGD,
    "nesterov": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


@pytest.mark.parametrize("name", TORCH_RULES)
def test_update_rules_on_complex_weights_are_torch_optims(name):
    """The rules' contract (what ``torch.optim`` computes) holds for a complex parameter:
    ``torch.optim``'s adaptive rules act on its real and imaginary parts
    (``torch.view_as_real``)."""
    torch_class = TORCH_RULES[name]
    momentum = {"momentum": 0.5} if name in ("sgd", "nesterov") else {}
    target = torch.tensor([1.0 + 2.0j, -0.5j, 3.0, 0.2 - 0.1j], dtype=CX)

    def loss(p: torch.Tensor) -> torch.Tensor:
        return (torch.arange(1.0, 5.0, dtype=torch.float64) * squared(p - target) ** 1.5).sum()

    rule = make_rule(name, **momentum)
    hyper = {"lr": [0.05], **{k: [v] for k, v in rule.hyper.items()}}
    ours, state = W0.clone().requires_grad_(), {}
    theirs = W0.clone().requires_grad_()
    extra = {"nesterov": True} if name == "nesterov" else {}
    optimizer = torch_class([theirs], lr=0.05, foreach=False, **momentum, **extra)
    for step in range(6):
        (grad,) = torch.autograd.grad(loss(ours), [ours])
        (new,), state = rule.update([ours], [grad], state, hyper, step)
        ours = new.detach().requires_grad_()
        optimizer.zero_grad()
        loss(theirs).backward()
        optimizer.step()
    assert relative(ours.detach(), theirs.detach()) < 1e-13
    assert relative(ours.detach(), W0) > 0.1


def test_per_element_step_sizes_apply_to_both_parts_of_a_complex_weight():
    """A per-element step size (real, of the weight's shape) scales the real and the
    imaginary part of its entry, in an adaptive rule as in plain SGD."""
    lr = torch.tensor([0.01, 0.02, 0.05, 0.1], dtype=torch.float64)
    grad = torch.tensor([1.0 - 1.0j, 2.0j, -3.0, 0.5 + 0.5j], dtype=CX)
    rule = make_rule("adam")
    hyper = {"lr": [lr], **{k: [v] for k, v in rule.hyper.items()}}
    (ours,), _ = rule.update([W0], [grad], {}, hyper, 0)
    parts = {**hyper, "lr": [lr.unsqueeze(-1).expand(D, 2)]}
    parts_of = torch.view_as_real
    (embedding,), _ = rule.update([parts_of(W0)], [parts_of(grad)], {}, parts, 0)
    torch.testing.assert_close(parts_of(ours), embedding, rtol=0, atol=0)


# --- meta-learning an initialization, online, distributed -------------------------------------


def task_loss(state: dict) -> torch.Tensor:
    return 0.5 * squared(residual(state)).mean()


def maml_hypergradient(method: Any, real: bool) -> torch.Tensor:
    net = Params(w=embedded(W0, real))
    ll = GradientDescent(task_loss, net, net, lr=0.3, iters=5)
    problem = BilevelProblem(ll, method(task_loss, net, task_loss, net))
    train, val = (
        (embedded(A, real), embedded(B, real)),
        (embedded(A_VAL, real), embedded(B_VAL, real)),
    )
    (grad,) = problem.hypergradient(train, val)
    return as_complex(grad)


@pytest.mark.parametrize(
    "method", [U.Reverse, U.Forward, U.MemorySavingReverse, U.FirstOrder, U.Reptile, U.PTT]
)
def test_a_complex_initialization_is_meta_learned_as_its_real_embedding(method):
    ours, embedding = maml_hypergradient(method, False), maml_hypergradient(method, True)
    assert relative(ours, embedding) < SAME


def online_run(
    method: Callable[..., Any], real: bool = False, steps: int = 40, checkpoint: Any = None
) -> torch.Tensor:
    """``lam`` after an online run of ``steps`` LL steps, a UL update every 10."""
    ll_model, ul_model = Params(w=embedded(W0, real)), Params(lam=embedded(LAM0, real))
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=0.3, iters=40)
    optimizer = torch.optim.SGD(ul_model.parameters(), lr=0.1)
    ul = method(ul_objective, ul_model, ll_objective, ll_model)
    online = OnlineHypergradient(ll, ul, optimizer, hyper_every=10)
    train, val = (
        (embedded(A, real), embedded(B, real)),
        (embedded(A_VAL, real), embedded(B_VAL, real)),
    )
    online.run(train, val, steps, progress=False, checkpoint=checkpoint)
    return as_complex(ul_model.lam.detach())


@pytest.mark.parametrize("method", [U.Forward, _with(U.Truncated, truncate_iter=10)])
def test_online_hypergradients_of_complex_variables_match_their_real_embedding(method):
    assert relative(online_run(method, False), online_run(method, True)) < SAME


def test_an_online_run_resumes_its_complex_tangents(tmp_path):
    """RTHO's checkpoint holds two tangents per complex entry (its check on resume counted
    one, and refused the run's own file)."""
    path = tmp_path / "online.pt"
    online_run(U.Forward, steps=20, checkpoint=path)
    resumed = online_run(U.Forward, steps=40, checkpoint=path)
    torch.testing.assert_close(resumed, online_run(U.Forward), rtol=0, atol=0)


def implicit_steps() -> list[torch.Tensor]:
    """Two Implicit steps (UL data sharded under torch.distributed): ``lam`` and the losses."""
    problem, ul_model, train, val = build(_implicit("cg", 30), iters=100)
    losses = torch.stack([problem.step(train, val), problem.step(train, val)])
    return [ul_model.lam.detach().clone(), losses]


def _worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    join_group(rank, world, rendezvous)
    try:
        torch.save(implicit_steps(), f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_complex_step_one_process_takes(tmp_path):
    rendezvous = str(tmp_path / "rendezvous")
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, rendezvous, out), nprocs=2, join=True)
    single = implicit_steps()
    for rank in range(2):
        lam, losses = torch.load(f"{out}.{rank}", weights_only=True)
        assert losses.dtype == torch.float64
        assert relative(lam, single[0]) < 1e-13 and relative(losses, single[1]) < 1e-13


def _reduce_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    join_group(rank, world, rendezvous)
    try:
        real = torch.full((3,), rank + 1.0, dtype=torch.float64)  # an odd size first
        torch.save(distributed.all_reduce_sum([real, (rank + 1) * W0]), f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_complex_tensor_after_a_real_one_of_odd_size_is_summed(tmp_path):
    """A real UL parameter of odd size before a complex one put the complex part at an odd
    offset of the all-reduce buffer, which ``view_as_complex`` refuses (a raw RuntimeError on
    every process). Fails before."""
    rendezvous = str(tmp_path / "rendezvous")
    out = str(tmp_path / "reduced")
    mp.spawn(_reduce_worker, args=(2, rendezvous, out), nprocs=2, join=True)
    for rank in range(2):
        real, summed = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(real, torch.full((3,), 3.0, dtype=torch.float64))
        torch.testing.assert_close(summed, 3 * W0, rtol=1e-15, atol=0)


# --- what is refused, and what is accepted now --------------------------------------------


def _learned_lr(value: Callable[[nn.Module], Any]) -> tuple[BilevelProblem, tuple, tuple]:
    ll_model = Params(w=W0)
    ul_model = Params(lam=LAM0, log_lr=torch.tensor(-1.0 + 0.5j, dtype=CX))
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=value, iters=5)
    problem = BilevelProblem(ll, U.Reverse(ul_objective, ul_model, ll_objective, ll_model))
    return problem, (A, B), (A_VAL, B_VAL)


@pytest.mark.parametrize(
    "lr",
    [torch.tensor(0.5 + 0.0j, dtype=CX), torch.tensor(0.5j, dtype=CX), lambda ul: ul.log_lr.exp()],
    ids=["complex-tensor", "imaginary-tensor", "complex-callable"],
)
def test_a_complex_step_size_is_refused_with_the_cure(lr):
    """A complex step size turns the gradient: the step is no descent step. Refused when the
    LL is built (a value) or at its first run (a callable's value), before any LL step."""
    with pytest.raises(ValueError, match=r"(?s)lr.*is complex.*real part.*\.real\.exp\(\)"):
        problem, train, val = _learned_lr(lr)
        problem.hypergradient(train, val)


def test_a_real_step_size_of_a_complex_model_is_accepted_and_learned():
    """A step size of the models' real dtype (float64 for complex128) was refused ("give it
    in complex128"); as a number, a float64 tensor, or a learned real part it is one step."""
    grads = []
    for lr in (0.3, torch.tensor(0.3, dtype=torch.float64)):
        ll_model, ul_model = Params(w=W0), Params(lam=LAM0)
        ll = GradientDescent(ll_objective, ll_model, ul_model, lr=lr, iters=5)
        problem = BilevelProblem(ll, U.Reverse(ul_objective, ul_model, ll_objective, ll_model))
        grads.append(problem.hypergradient((A, B), (A_VAL, B_VAL))[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    problem, train, val = _learned_lr(lambda ul: ul.log_lr.real.exp())
    _, d_log_lr = problem.hypergradient(train, val)
    assert d_log_lr.real.abs() > 1e-4 and d_log_lr.imag == 0  # the real part alone is read


def test_complex_data_of_another_precision_is_refused_before_the_ll_runs():
    problem, _, _, val = build(U.Reverse, iters=5)
    with pytest.raises(ValueError, match=r"complex64.*complex128.*\.to\(torch\.complex128\)"):
        problem.hypergradient((A.to(torch.complex64), B), val)


def test_real_data_of_the_parts_precision_is_accepted_as_complex_data_is_by_real_models():
    """Real features of a complex model (float64 for complex128: one precision, as the
    docs' rule says) were refused ("convert it with .to(torch.complex128)") while complex
    data for real models was accepted. Fails before."""

    def loss(state: dict) -> torch.Tensor:
        x, w = state["data"].to(CX), state["ll_model"].w
        return 0.5 * squared(x @ w - state["target"]).mean() + 0.5 * squared(w).sum()

    grads = []
    for features in (A.real, A.real.to(CX)):
        net = Params(w=W0)
        ll = GradientDescent(loss, net, net, lr=0.3, iters=5)
        problem = BilevelProblem(ll, U.Reverse(loss, net, loss, net))
        grads.append(problem.hypergradient((features, B), (features, B))[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"float32.*complex128.*\.to\(torch\.float64\)"):
        problem.hypergradient((A.real.float(), B), (A.real, B))


def test_an_objective_that_returns_a_complex_loss_is_refused_with_the_cure():
    def complex_loss(state: dict) -> torch.Tensor:
        return residual(state).mean()

    ll_model, ul_model = Params(w=W0), Params(lam=LAM0)
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=0.5, iters=5)
    problem = BilevelProblem(ll, U.Reverse(complex_loss, ul_model, ll_objective, ll_model))
    with pytest.raises(TypeError, match=r"real loss.*complex128.*r\.real\*\*2"):
        problem.hypergradient((A, B), (A_VAL, B_VAL))


def test_complex_constraint_values_are_refused_with_their_dtype():
    problem, _, train, val = build(
        _with(U.GAFFO, ll_constraints=lambda s: as_complex(s["ll_model"].w) - 0.05), iters=3
    )
    with pytest.raises(TypeError, match=r"real floating-point.*complex128.*w\.real"):
        problem.step(train, val)


# --- the pieces -----------------------------------------------------------------------------


def test_the_inner_product_of_complex_vectors_is_that_of_their_real_embedding():
    a, b = [A[:, 0], W0], [B, LAM0]
    value = linalg.dot(a, b)
    parts = sum(
        (torch.view_as_real(x) * torch.view_as_real(y)).sum() for x, y in zip(a, b, strict=True)
    )
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, parts, rtol=1e-14, atol=0)
    torch.testing.assert_close(linalg.norm(a) ** 2, linalg.dot(a, a), rtol=1e-14, atol=0)


def test_a_complex_hypergradient_with_nan_in_one_part_is_refused():
    finite = torch.tensor([1.0 + 2.0j, -3.0j], dtype=CX)
    check_hypergradient([finite])
    check_hypergradient([finite, finite])
    for bad in (complex(0.0, float("nan")), complex(float("inf"), 0.0)):
        with pytest.raises(FloatingPointError, match="not finite"):
            check_hypergradient([torch.tensor([1.0, bad], dtype=CX)])


def test_a_real_multiplier_of_complex_weights_stays_real_when_the_state_is_restored(tmp_path):
    """BUG (before the fix): restoring GAFFO's state (after a hypergradient query, a caught
    error, or from a checkpoint) cast its real constraint multiplier z to the LL weights'
    complex dtype, and the next step raised in torch.clamp."""
    method = STEPPED["GAFFO-constraints"][0]
    problem, _, train, val = build(method, False, 3)
    problem.step(train, val)
    assert not problem.ul.auxiliary["z"][0].is_complex()
    problem.hypergradient(train, val)  # puts the method's state back
    assert not problem.ul.auxiliary["z"][0].is_complex()
    problem.step(train, val)
    path = tmp_path / "state.pt"
    checkpoint.save(path, problem.state_dict())
    fresh, _, _, _ = build(method, False, 3)
    fresh.load_state_dict(checkpoint.load(path))
    assert not fresh.ul.auxiliary["z"][0].is_complex()
    fresh.step(train, val)

"""The costs the docs state, counted (docs/methods.md, docs/choosing.md, the methods'
docstrings): per UL step, the evaluations of the LL and UL objectives, the backward passes
(``torch.autograd.grad`` calls), the Hessian-vector and other second-order products, and the
autograd graph kept alive, as functions of the number of LL steps ``T`` and of the solver's
iterations ``k``.

The counts are integers and are pinned exactly: a change that adds work fails here (update
the docs and the claim together). How they are counted:

- objectives are wrapped callables (calls, and calls whose result records a graph);
- every ``torch.autograd.grad`` call is one backward pass; it is *second order* when the part
  of the graph it runs (from its outputs to its inputs) passes through gradients taken with
  ``create_graph=True``: a Hessian-vector product, a mixed product, or back-propagation
  through LL steps (``through`` counts those graph gradients: one per LL step on a model with
  one weight tensor); a batched call (``is_grads_batched``) counts its batch;
- memory is the number of elements of the tensors saved for backward that are alive
  (``saved_tensors_hooks``; the garbage collector is off while counting, so that only
  reference counts free them: deterministic). Its peak over a UL step is compared across
  ``T``: flat, or growing by the same amount per LL step.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from problems import DTYPE, FeatureL2, Linear, Problem

from bilevel import BilevelProblem, linalg
from bilevel.ll import BDA, GradientDescent, rules
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

# ---- the counting harness ------------------------------------------------------------------

#: the mark a node of a gradient taken with ``create_graph=True`` carries in its metadata
GRAPH_GRADIENT = "cost_claims_graph_gradient"


def _nodes(tensors: list[Any]) -> list[Any]:
    """The autograd nodes that backward reaches ``tensors`` by (outputs, or inputs' edges)."""
    return [
        torch.autograd.graph.get_gradient_edge(t).node
        for t in tensors
        if isinstance(t, torch.Tensor) and t.requires_grad
    ]


def graph_gradients_on_path(outputs: list[Any], inputs: list[Any]) -> int:
    """How many nodes of gradients taken with a graph lie on a path from ``outputs`` to
    ``inputs``: the part of the graph that ``torch.autograd.grad(outputs, inputs)`` runs.
    (An iterative depth-first walk: a recursive closure would make a reference cycle that
    keeps the graph alive until the garbage collector runs.)"""
    targets = {id(node) for node in _nodes(inputs)}
    seen: dict[int, Any] = {}
    reaches: dict[int, bool] = {}
    marked = 0
    stack = [(node, False) for node in _nodes(outputs)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:  # (a DAG: every child is done before its parent)
            hit = any(c is not None and reaches[id(c)] for c, _ in node.next_functions)
            reaches[key] = hit
            marked += hit and bool(node.metadata.get(GRAPH_GRADIENT))
            continue
        if key in seen:
            continue
        seen[key] = node
        if key in targets:
            reaches[key] = True
            continue
        stack.append((node, True))
        stack.extend((c, False) for c, _ in node.next_functions if c is not None)
    return marked


@dataclass
class Backward:
    """One ``torch.autograd.grad`` call."""

    create_graph: bool
    through: int  # gradients taken with a graph on the path it runs (0: first order)
    batch: int  # products in one call (``is_grads_batched``), else 1


@dataclass
class Costs:
    """What one UL step did (see the module docstring)."""

    backwards: list[Backward] = field(default_factory=list)
    other_backwards: int = 0  # torch.autograd.backward / Tensor.backward calls
    live: int = 0  # elements of the tensors saved for backward, alive now
    peak: int = 0

    @property
    def gradients(self) -> int:
        """First-order backward passes (gradients), with or without a graph."""
        return sum(b.through == 0 for b in self.backwards)

    @property
    def with_graph(self) -> int:
        """Gradients taken with ``create_graph=True`` (to be differentiated again)."""
        return sum(b.through == 0 and b.create_graph for b in self.backwards)

    @property
    def second_order(self) -> int:
        """Products through a gradient taken with a graph (HVPs, mixed products,
        back-propagation through LL steps), a batched call counting its batch."""
        return sum(b.batch for b in self.backwards if b.through > 0)

    @property
    def through(self) -> list[int]:
        """For each second-order call, the gradients taken with a graph that it runs through
        (the LL steps back-propagated through, for a model with one weight tensor)."""
        return [b.through for b in self.backwards if b.through > 0]


class _Saved:
    """A tensor saved for backward, counted while its graph holds it (detached: holding the
    tensor itself would make a cycle through its grad_fn)."""

    def __init__(self, costs: Costs, tensor: torch.Tensor) -> None:
        self.costs, self.tensor, self.size = costs, tensor.detach(), tensor.numel()
        costs.live += self.size
        costs.peak = max(costs.peak, costs.live)

    def __del__(self) -> None:
        self.costs.live -= self.size


@contextlib.contextmanager
def counting() -> Iterator[Costs]:
    """Count the backward passes and the saved tensors of the code run inside."""
    costs = Costs()
    grad, backward = torch.autograd.grad, torch.autograd.backward
    signature = inspect.signature(grad)

    def counted_grad(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        outputs = [a["outputs"]] if isinstance(a["outputs"], torch.Tensor) else list(a["outputs"])
        inputs = [a["inputs"]] if isinstance(a["inputs"], torch.Tensor) else list(a["inputs"])
        batch = 1
        if a["is_grads_batched"]:
            seeds = a["grad_outputs"]
            batch = (seeds if isinstance(seeds, torch.Tensor) else seeds[0]).shape[0]
        through = graph_gradients_on_path(outputs, inputs)
        costs.backwards.append(Backward(bool(a["create_graph"]), through, batch))
        result = grad(*args, **kwargs)
        if a["create_graph"]:
            for r in result:
                if r is not None and r.grad_fn is not None:
                    r.grad_fn.metadata[GRAPH_GRADIENT] = True
        return result

    def counted_backward(*args: Any, **kwargs: Any) -> Any:
        costs.other_backwards += 1
        return backward(*args, **kwargs)

    collecting = gc.isenabled()
    gc.disable()
    torch.autograd.grad, torch.autograd.backward = counted_grad, counted_backward
    try:
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: _Saved(costs, t), lambda saved: saved.tensor
        ):
            yield costs
    finally:
        torch.autograd.grad, torch.autograd.backward = grad, backward
        if collecting:
            gc.enable()


class Counted:
    """An objective that counts its evaluations, and those whose result records a graph."""

    def __init__(self, objective: Callable[[dict], torch.Tensor]) -> None:
        self.objective = objective
        self.calls = self.graphs = 0

    def __call__(self, state: dict) -> torch.Tensor:
        value = self.objective(state)
        self.calls += 1
        self.graphs += bool(value.requires_grad)
        return value

    def reset(self) -> None:
        self.calls = self.graphs = 0


# ---- the problem: logistic regression with one L2 penalty per feature ----------------------

D = 6  # LL weights, and UL scalars (one penalty per feature): p = D
K = 3  # solver iterations, series terms, Neumann and v steps (below D: CG does not converge)
CHOSEN = 2  # Truncated's K


def ll_objective(state: dict) -> torch.Tensor:
    logits = state["ll_model"](state["data"])
    loss = F.binary_cross_entropy_with_logits(logits, state["target"])
    return loss + state["ul_model"].penalty(state["ll_model"])


def ul_objective(state: dict) -> torch.Tensor:
    """The validation loss, plus a small direct term (so that FirstOrder, Alternating and the
    first-order methods have a UL gradient to give)."""
    logits = state["ll_model"](state["data"])
    direct = 1e-3 * (state["ul_model"].log_l2 ** 2).sum()
    return F.binary_cross_entropy_with_logits(logits, state["target"]) + direct


def maml_objective(state: dict) -> torch.Tensor:
    logits = state["ll_model"](state["data"])
    return F.binary_cross_entropy_with_logits(logits, state["target"])


def logistic(n: int = 40, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    x, xv = (torch.randn(n, D, generator=g, dtype=DTYPE) for _ in range(2))
    w = torch.randn(D, generator=g, dtype=DTYPE)
    y = (x @ w + 0.5 * torch.randn(n, generator=g, dtype=DTYPE) > 0).to(DTYPE)
    yv = (xv @ w > 0).to(DTYPE)
    return Problem(Linear(D), FeatureL2(D), (x, y), (xv, yv))


@dataclass
class Measured:
    """One UL step's counts, and the method that took it."""

    ll: int  # LL objective evaluations
    ll_graphs: int  # of which recorded a graph
    ul: int
    ul_graphs: int
    costs: Costs
    method: Any

    def counts(self) -> dict[str, Any]:
        c = self.costs
        return {
            "ll": self.ll,
            "ll_graphs": self.ll_graphs,
            "ul": self.ul,
            "ul_graphs": self.ul_graphs,
            "gradients": c.gradients,
            "with_graph": c.with_graph,
            "second_order": c.second_order,
            "through": c.through,
        }


def measure(
    make: Callable[..., Any],
    iters: int,
    dynamics: str = "gd",
    lr: float = 0.1,
    maml: bool = False,
    warmup: int | None = None,
    counters: tuple[Counted, ...] = (),
) -> Measured:
    """Build the problem with ``iters`` LL steps, take ``warmup`` UL steps (default: one for
    methods that keep state across UL steps, whose first step differs), then count one
    (``counters``: other counted callables the method was given, reset with the objectives)."""
    p = logistic()
    ll_f = Counted(maml_objective if maml else ll_objective)
    ul_f = Counted(maml_objective if maml else ul_objective)
    ul_model = p.ll_model if maml else p.ul_model
    method = make(ul_f, ul_model, ll_f, p.ll_model)
    if dynamics == "bda":
        ll = BDA(
            ll_f, p.ll_model, ul_model, lr, iters, ul_objective=ul_f, alpha=0.5, alpha_decay=0.9
        )
    elif dynamics == "momentum":
        ll = GradientDescent(
            ll_f, p.ll_model, ul_model, lr=lr, iters=iters, optimizer=rules.sgd(momentum=0.9)
        )
    else:
        ll = GradientDescent(ll_f, p.ll_model, ul_model, lr=lr, iters=iters)
    problem = BilevelProblem(ll, method, torch.optim.SGD(ul_model.parameters(), lr=1e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # FiniteDifference with T > 1, IGA
        for _ in range(int(method.keeps_ll_state) if warmup is None else warmup):
            problem.step(p.train, p.val)
        for counter in (ll_f, ul_f, *counters):
            counter.reset()
        with counting() as costs:
            problem.step(p.train, p.val)
    return Measured(ll_f.calls, ll_f.graphs, ul_f.calls, ul_f.graphs, costs, method)


# ---- the claims ------------------------------------------------------------------------------


def dense_solver(matvec: linalg.MatVec, b: list[torch.Tensor]) -> list[torch.Tensor]:
    """A user's solver: ``K`` Richardson steps (``K`` products)."""
    x = [torch.zeros_like(t) for t in b]
    for _ in range(K):
        x = [xi + 0.1 * (bi - ai) for xi, bi, ai in zip(x, b, matvec(x), strict=True)]
    return x


def implicit(method: Any, **options: Any) -> Callable[..., Implicit]:
    return lambda *a: Implicit(
        *a, k=K, method=method, tolerance=0.0, stationarity_warning=None, **options
    )


def per_step(
    ll: int,
    ul: int,
    gradients: int,
    with_graph: int = 0,
    through: tuple[int, ...] | list[int] = (),
    second_order: int | None = None,
    ll_graphs: int | None = None,
    ul_graphs: int | None = None,
) -> dict[str, Any]:
    """The counts of :meth:`Measured.counts`: ``ll`` and ``ul`` objective evaluations (all
    with a graph unless said), ``gradients`` (``with_graph`` of them with ``create_graph``),
    and one second-order call per entry of ``through`` (unless ``second_order`` says)."""
    return {
        "ll": ll,
        "ll_graphs": ll if ll_graphs is None else ll_graphs,
        "ul": ul,
        "ul_graphs": ul if ul_graphs is None else ul_graphs,
        "gradients": gradients,
        "with_graph": with_graph,
        "second_order": len(through) if second_order is None else second_order,
        "through": list(through),
    }


def implicit_counts(T: int, products: int) -> dict[str, Any]:
    """``Implicit``, ``DM``: the LL run without a graph, one UL gradient, one LL gradient with
    its graph, ``products`` HVPs, one mixed product."""
    return per_step(T + 1, 1, T + 2, with_graph=1, through=[1] * (products + 1))


def stochastic_counts(T: int, products: int) -> dict[str, Any]:
    """StocBiO, AmIGO, StochasticImplicit: ``T`` LL gradients, ``products`` HVPs and one cross
    product (each an LL gradient with its graph and one backward pass through it), one UL
    gradient."""
    n = products + 1
    return per_step(T + n, 1, T + n + 1, with_graph=n, through=[1] * n)


@dataclass
class Claim:
    """A documented cost, as counts per UL step for ``T`` LL steps."""

    doc: str  # the claim, as the docs state it
    make: Callable[..., Any]
    counts: Callable[[int], dict[str, Any]]
    steps: tuple[int, ...] = (3, 5)
    options: dict[str, Any] = field(default_factory=dict)  # of measure()


CLAIMS = {
    "Reverse": Claim(
        "T gradients with a graph, one backward pass through them",
        Reverse,
        lambda T: per_step(T, 1, T, with_graph=T, through=[T]),
    ),
    "Truncated": Claim(
        "T gradients, the last K with a graph, a backward pass through K",
        lambda *a: Truncated(*a, truncate_iter=CHOSEN),
        lambda T: per_step(T, 1, T, with_graph=CHOSEN, through=[CHOSEN]),
    ),
    "Reverse over BDA": Claim(
        "each LL step evaluates f and F and back-propagates both (one pass); T steps",
        Reverse,
        lambda T: per_step(T, T + 1, T, with_graph=T, through=[T]),
        options={"dynamics": "bda"},
    ),
    "Implicit cg": Claim(
        "T gradients without a graph, <= k HVPs, one mixed product",
        implicit("cg"),
        lambda T: implicit_counts(T, K),
    ),
    "Implicit neumann": Claim(
        "k + 1 HVPs (k terms after the first; the last product gives the residual)",
        implicit("neumann"),
        lambda T: implicit_counts(T, K + 1),
    ),
    "Implicit neumann auto": Claim(
        "alpha='auto' adds power_iters HVPs (power iteration)",
        implicit("neumann", alpha="auto", power_iters=5),
        lambda T: implicit_counts(T, 5 + K + 1),
    ),
    "Implicit fixed_point": Claim(
        "k HVPs",
        implicit("fixed_point"),
        lambda T: implicit_counts(T, K),
    ),
    "Implicit minres": Claim(
        "1 HVP per iteration, and 1 for the true residual",
        implicit("minres"),
        lambda T: implicit_counts(T, K + 1),
    ),
    "Implicit normal_cg": Claim(
        "2 HVPs per iteration, and 1 to start",
        implicit("normal_cg"),
        lambda T: implicit_counts(T, 2 * K + 1),
    ),
    "Implicit callable": Claim(
        "the solver's own products, plus one HVP to check its residual",
        implicit(dense_solver),
        lambda T: implicit_counts(T, K + 1),
    ),
    "Forward": Claim(
        "T steps, each with p JVPs (batched) and one VJP; no graph across steps",
        Forward,
        # per step: a VJP through the step's gradient, then D JVPs (one batched call) through
        # it and the VJP
        lambda T: per_step(T, 1, T + 1, with_graph=T, through=[1, 2] * T, second_order=T * (D + 1)),
    ),
    "FirstOrder": Claim(
        "T gradients without a graph, one UL gradient",
        FirstOrder,
        lambda T: per_step(T, 1, T + 1),
    ),
    "FirstOrder MAML": Claim(
        "T gradients without a graph, one UL gradient",
        FirstOrder,
        lambda T: per_step(T, 1, T + 1),
        options={"maml": True},
    ),
    "Reptile": Claim(
        "T gradients without a graph (the UL loss is evaluated for logging, without one)",
        Reptile,
        lambda T: per_step(T, 1, T, ul_graphs=0),
        options={"maml": True},
    ),
    "MemorySavingReverse": Claim(
        "T gradients without a graph, then T steps recomputed with a graph, each with one "
        "backward pass through it",
        MemorySavingReverse,
        lambda T: per_step(2 * T, 1, 2 * T + 1, with_graph=T, through=[1] * T),
    ),
    "FiniteDifference": Claim(
        "the LL run, 1 UL gradient, 2 LL gradients, no HVP, no LL graph",
        FiniteDifference,
        lambda T: per_step(T + 2, 1, T + 3),
    ),
    "IGA": Claim(
        "the LL run, 2 gradients, 3 HVPs",
        IGA,
        lambda T: per_step(T + 1, 1, T + 2, with_graph=1, through=[1, 1, 1]),
    ),
    "DM": Claim(
        "the LL run, one UL gradient, one LL gradient with its graph, 1 HVP, 1 mixed product",
        lambda *a: DM(*a, eta=0.1),
        lambda T: implicit_counts(T, 1),
    ),
    "DM auto": Claim(
        "2 HVPs with eta='auto', 1 mixed product",
        DM,
        lambda T: implicit_counts(T, 2),
    ),
    "StochasticImplicit": Claim(
        "the LL run, `steps` HVPs (each on its minibatch: an LL gradient with its graph), one "
        "cross product, one UL gradient",
        lambda *a: StochasticImplicit(*a, steps=K),
        lambda T: stochastic_counts(T, K),
    ),
    "SOBA": Claim(
        "1 gradient, 1 HVP and 1 cross product (one backward pass), 1 UL gradient",
        lambda *a: SOBA(*a, batch_size=None),
        lambda T: per_step(1, 1, 2, with_graph=1, through=[1]),
        steps=(1,),
    ),
    "SABA": Claim(
        "as SOBA",
        lambda *a: SABA(*a, batch_size=None),
        lambda T: per_step(1, 1, 2, with_graph=1, through=[1]),
        steps=(1,),
    ),
    "StocBiO": Claim(
        "T gradients, Q HVPs, 1 cross product, 1 UL gradient",
        lambda *a: StocBiO(*a, neumann_steps=K, batch_size=None),
        lambda T: stochastic_counts(T, K),
    ),
    "AmIGO": Claim(
        "T gradients, M HVPs, 1 cross product, 1 UL gradient",
        lambda *a: AmIGO(*a, v_iters=K, batch_size=None),
        lambda T: stochastic_counts(T, K),
    ),
    "AmIGO default M": Claim(
        "M = ll.iters by default",
        lambda *a: AmIGO(*a, batch_size=None),
        lambda T: stochastic_counts(T, T),
    ),
    "BOME": Claim("T + 3 gradients, no HVP", BOME, lambda T: per_step(T + 2, 1, T + 3)),
    "PBGD": Claim(
        "T + 3 gradients, no HVP (value penalty)",
        PBGD,
        lambda T: per_step(T + 2, 1, T + 3),
    ),
    "PBGD gradient penalty": Claim(
        "G-PBGD: one HVP (an LL gradient with its graph, one backward through it), one UL "
        "gradient; T is not used",
        lambda *a: PBGD(*a, penalty="gradient"),
        lambda T: per_step(1, 1, 2, with_graph=1, through=[1]),
    ),
    "BVFIM": Claim(
        "T + y_iters + 3 gradients (y_iters of F and f together), and 3 forward evaluations",
        lambda *a: BVFIM(*a, y_iters=2),
        lambda T, y=2: per_step(T + y + 4, y + 2, T + y + 3, ll_graphs=T + y + 2, ul_graphs=y + 1),
    ),
    "MESO": Claim(
        "6 gradients (2 of F, 4 of f); ll.iters is not used",
        MESO,
        lambda T: per_step(4, 2, 6),
    ),
    "MESO first step": Claim(
        "4 gradients at the first UL step (1 of F, 3 of f)",
        MESO,
        lambda T: per_step(3, 1, 4),
        options={"warmup": 0},
    ),
    "GAFFO": Claim(
        "4 gradients (3 of f, 1 of F); ll.iters is not used",
        GAFFO,
        lambda T: per_step(3, 1, 4),
    ),
    "F2SA": Claim(
        "2T + 3 gradients (T of F + lambda f: T evaluations of each)",
        F2SA,
        lambda T: per_step(2 * T + 2, T + 1, 2 * T + 3),
    ),
    "Alternating": Claim(
        "T + 1 gradients (the LL loss it reports is evaluated without a graph)",
        Alternating,
        lambda T: per_step(T + 1, 1, T + 1, ll_graphs=T),
    ),
}


def cases(claims: dict[str, Claim]) -> list[Any]:
    return [pytest.param(name, T, id=f"{name}-T{T}") for name, c in claims.items() for T in c.steps]


@pytest.mark.parametrize(("name", "T"), cases(CLAIMS))
def test_counts_per_ul_step(name: str, T: int) -> None:
    claim = CLAIMS[name]
    measured = measure(claim.make, T, **claim.options)
    assert measured.costs.other_backwards == 0  # every derivative is a torch.autograd.grad
    assert measured.counts() == claim.counts(T), f"{name}: the docs say {claim.doc!r}"


@pytest.mark.parametrize("T", [3, 5])
def test_ptt_evaluates_the_ul_loss_once_per_step_and_backpropagates_through_k_star(T) -> None:
    """PTT: one UL forward pass per LL step without a graph to choose k*, one with it at k*,
    one backward pass through the first k* steps (k* = ``diagnostics["ptt_step"]``)."""
    measured = measure(PTT, T)
    chosen = measured.method.diagnostics["ptt_step"]
    assert 1 <= chosen <= T
    assert measured.counts() == per_step(T, T + 1, T, T, through=[chosen], ul_graphs=1)


def test_gaffo_with_constraints_counts() -> None:
    """GAFFO with LL constraints g: 3 gradients of the Lagrangian f + z^T g (f and g evaluated
    in each), 2 evaluations of g and one of f without a graph, one UL gradient."""
    constraint = Counted(lambda state: state["ll_model"].w.sum().reshape(1) - 10.0)
    measured = measure(lambda *a: GAFFO(*a, ll_constraints=constraint), 3, counters=(constraint,))
    assert measured.counts() == per_step(4, 1, 4, ll_graphs=3)
    assert constraint.calls == 5


# ---- memory ----------------------------------------------------------------------------------


def peak(name: str, T: int) -> int:
    claim = CLAIMS[name]
    measured = measure(claim.make, T, **claim.options)
    assert measured.costs.live == 0  # nothing of the step's graph outlives it
    return measured.costs.peak


GROWING = ["Reverse", "Reverse over BDA"]
FLAT = [name for name, claim in CLAIMS.items() if name not in GROWING and claim.steps != (1,)]


@pytest.mark.parametrize("name", GROWING)
def test_graph_memory_grows_linearly_with_the_ll_steps(name: str) -> None:
    """``Reverse`` keeps the graph of every LL step (over BDA: of f and F at every step)."""
    two, four, six = (peak(name, T) for T in (2, 4, 6))
    assert four - two == six - four > 0


def test_ptt_graph_memory_is_reverse_s() -> None:
    """PTT: memory as ``Reverse`` (every step keeps its graph), whichever k* it takes."""
    for T in (2, 4):
        ptt = measure(PTT, T).costs
        assert ptt.live == 0
        assert ptt.peak == peak("Reverse", T)


@pytest.mark.parametrize("name", FLAT)
def test_graph_memory_is_flat_in_the_ll_steps(name: str) -> None:
    """Every other method keeps no graph across LL steps (``Truncated``: the last K only;
    ``Forward``: one step's; ``MemorySavingReverse``: one recomputed step's; the stochastic and
    first-order methods: one evaluation's)."""
    assert peak(name, 2) == peak(name, 5)


def test_truncated_graph_memory_grows_linearly_with_k() -> None:
    sizes = [
        measure(lambda *a, k=k: Truncated(*a, truncate_iter=k), 6).costs.peak for k in (1, 2, 3)
    ]
    assert sizes[1] - sizes[0] == sizes[2] - sizes[1] > 0


@pytest.mark.parametrize("dynamics", ["gd", "momentum"])
def test_memory_saving_reverse_stores_one_copy_per_step(dynamics: str) -> None:
    """``MemorySavingReverse`` stores ``T`` copies of the weights and the update rule's state
    before each step (momentum: none before the first step), and no graph across steps."""
    for T in (2, 5):
        measured = measure(MemorySavingReverse, T, dynamics=dynamics)
        copies = T if dynamics == "gd" else 2 * T - 1
        assert measured.method.diagnostics["stored_bytes"] == copies * D * DTYPE.itemsize

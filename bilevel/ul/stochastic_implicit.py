"""Stochastic implicit hypergradients: the linear system solved by a stochastic optimizer with
minibatch Hessian (or Gauss-Newton) vector products (SID)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bilevel import linalg
from bilevel.ll import Trajectory, evaluate_at
from bilevel.ll.patched import refuse_broken_weight_norm
from bilevel.second_derivatives import gradient_to_differentiate, refuse_once_differentiable
from bilevel.settings import Fixed, Setting
from bilevel.state import Objective, capture_draws, check_objective_result, make_state, replay_draws
from bilevel.ul.base import (
    Call,
    Grads,
    HypergradientCalculator,
    detached_weights,
    refuse_rule_weight_decay,
)
from bilevel.ul.implicit import HypergradientDivergenceError
from bilevel.ul.sampling import num_samples, select

Tensors = list[torch.Tensor]
Batch = tuple[Any, Any]
#: ``ll_outputs(state) -> (outputs, output_loss, rest)``: see :class:`StochasticImplicit`
Outputs = Callable[
    [dict[str, Any]], tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], Any]
]

CURVATURES = ("hessian", "gauss_newton")
CROSS = ("minibatch", "full")
#: the last minibatch residual above this multiple of ``||v||`` (that of ``q = 0``)
#: declares the solve diverged
DIVERGED = 100.0
#: what an int ``batches`` advises for LL data it cannot draw rows from
TAKE_AS_GIVEN = (
    "pass batches=None to use the LL data as given, or a callable batches=lambda draw: "
    "(data, target) that draws its own minibatches"
)
FIXED_POINT_REFUSED = (
    "StochasticImplicit solves H q = v with the Hessian of ll_objective, but this LL is a "
    "fixed-point map, whose implicit system (I - dPhi/dw)^T q = v is not a Hessian: use "
    "Implicit(method='fixed_point') or Implicit(method='normal_cg')."
)


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _check_callable(value: Any, name: str, signature: str) -> Any:
    """``None`` or a callable of ``signature`` (in words, for the message)."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable {signature}, got {value!r}.")
    return value


def _check_batches(value: Any, name: str) -> int | Callable[[int], Batch] | None:
    """``None``, a callable, or a minibatch size (an integer >= 1)."""
    if value is None or callable(value):
        return value
    return _count(value, f"{name} (a minibatch size)", 1)


def _check_cross(value: Any, name: str) -> str:
    """One of ``CROSS``."""
    if value not in CROSS:
        raise ValueError(f"{name} must be one of {CROSS}, got {value!r}.")
    return value


def _check_outputs_given(curvature: str, ll_outputs: Any) -> None:
    """Refuse ``curvature="gauss_newton"`` without a callable ``ll_outputs``."""
    if curvature == "gauss_newton" and not callable(ll_outputs):
        raise ValueError(
            "curvature='gauss_newton' needs ll_outputs: a callable state -> (outputs, "
            "output_loss, rest) that splits ll_objective into a loss of the model's outputs "
            "and the other terms, e.g. lambda s: (s['ll_model'](s['data']), lambda z: "
            "F.cross_entropy(z, s['target']), penalty(s))."
        )


def _check_seed(value: Any, name: str) -> int:
    """An int (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    return value


@contextlib.contextmanager
def _frozen(params: Tensors) -> Iterator[None]:
    """``requires_grad`` off on ``params`` while Hessian-vector products are taken in the LL
    weights only (no graph to the UL parameters is recorded), restored on exit."""
    frozen = [p for p in params if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _or_zeros(grads: tuple, like: Tensors) -> Tensors:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like, strict=True)]


class StochasticImplicit(HypergradientCalculator):
    """Implicit hypergradient with the linear system solved stochastically (SID).

    With ``v = grad_w L_ul(w, lambda)`` at the LL solution ``w``, ``q`` approximately solves
    ``H q = v`` by running a ``torch.optim`` optimizer for ``steps`` steps on the quadratic
    ``1/2 q^T H q - v^T q``, whose gradient ``H_b q - v`` is taken with a Hessian-vector product
    of ``ll_objective`` on a fresh minibatch ``b`` of the LL data at every step (an unbiased
    estimate of ``H q - v`` when the LL objective is a mean over samples plus terms that do not
    depend on the data). Then::

        dF/dlambda = grad_lambda L_ul - (d g_c / dlambda)^T q

    with ``g_c`` the LL gradient on ``cross="minibatch"``: one more fresh minibatch, drawn
    independently of the solver's, as in the paper's algorithm (so that the product is
    unbiased given ``q``), or ``cross="full"``: the full LL batch. Plain SGD on the quadratic
    with a constant step ``alpha`` is the paper's stochastic fixed-point iteration
    ``q <- q - alpha (H_b q - v)``; it converges when ``alpha < 2 / lambda_max`` of the
    minibatch Hessians, to a noise ball whose size decreasing steps shrink (pass a
    ``solver_scheduler``). With independent draws, the mean of the hypergradient over draws is
    the full-batch hypergradient with the same solver steps (for SGD or heavy ball with fixed
    step sizes, whose iterates are linear in the draws' Hessians), and its error falls as
    ``1 / sqrt(draws)``.

    ``curvature="gauss_newton"`` replaces ``H`` by the generalized Gauss-Newton matrix
    ``J^T H_out J + H_rest`` of ``ll_objective(state) = output_loss(outputs) + rest`` (``J``:
    the Jacobian of the model's outputs in the LL weights, ``H_out``: the Hessian of
    ``output_loss`` in the outputs), given by ``ll_outputs(state) -> (outputs, output_loss,
    rest)``: positive semi-definite when ``output_loss`` is convex in the outputs and ``rest``
    convex, even where the LL Hessian is not. Each product costs about one Hessian-vector
    product (a Jacobian-vector product by the double-backward trick, a product with
    ``H_out``, a vector-Jacobian product). The cross term keeps the exact mixed derivative.

    Cost per call: ``steps`` minibatch Hessian (or Gauss-Newton) vector products, one cross
    product, one UL gradient; memory of one minibatch graph. Draws come from the method's own
    ``torch.Generator`` (seeded by ``seed``, saved by :meth:`state_dict`), never from the
    global RNG. A solve whose last residual is above 100 times that of ``q = 0`` (``||v||``)
    raises :class:`HypergradientDivergenceError` (a step too large for the curvature, which
    SGD on the quadratic amplifies geometrically). ``diagnostics``: ``steps``, ``draws``,
    ``q_norm`` (of the ``q`` returned), ``rhs_norm`` (``||v||``) and
    ``minibatch_residual_norm``: ``||H_b q - v||`` on the last step's minibatch, at the ``q``
    that step started from (the gradient it took; no extra product), not at the ``q``
    returned.

    References: Grazzi, Pontil & Salzo (2021), "Convergence Properties of Stochastic
    Hypergradients", AISTATS (SID); Pedregosa (2016), "Hyperparameter optimization with
    approximate gradient", ICML (HOAG); Schraudolph (2002), "Fast Curvature Matrix-Vector
    Products for Second-Order Gradient Descent", Neural Computation (Gauss-Newton products).

    Args:
        ul_objective: ``state -> scalar`` UL loss.
        ul_model: module with the UL variables.
        ll_objective: ``state -> scalar`` LL loss (a mean over the samples of its batch plus
            data-independent terms, for unbiased minibatch products).
        ll_model: the LL module.
        solver_optimizer: ``params -> torch.optim.Optimizer`` over the solution ``q`` (a list of
            tensors shaped like the trainable LL weights); default plain SGD with the LL run's
            step size (``alpha < 2 / lambda_max`` if the LL converged with gradient descent).
        steps: optimizer steps on the quadratic (>= 1).
        batches: the minibatches of the solver steps and of a minibatch cross term: ``None``
            (the full LL batch: deterministic), an int (that many samples, drawn without
            replacement from the LL batch: the same rows of every tensor in ``(data,
            target)``, tensors or tuples, lists and dicts of them with one row per sample
            along their first dimension, split as the other stochastic methods' samplers
            split them), or a callable ``draw -> (data, target)`` (``draw`` counts the draws
            since construction; the callable owns its randomness).
        cross: ``"minibatch"`` (the paper's choice) or ``"full"``.
        curvature: ``"hessian"`` or ``"gauss_newton"`` (needs ``ll_outputs``).
        ll_outputs: for ``"gauss_newton"``: ``state -> (outputs, output_loss, rest)``, with
            ``outputs`` computed from ``state["ll_model"]``, ``output_loss`` a function of the
            outputs alone (targets and UL variables may be captured), and ``rest`` the other
            terms of ``ll_objective`` (a scalar tensor, e.g. a weight penalty, or ``0.0``);
            checked once per call against ``ll_objective`` on the full batch.
        solver_scheduler: optional ``optimizer -> scheduler`` (``torch.optim.lr_scheduler``),
            stepped after every solver step (decreasing steps, as the paper's analysis).
        seed: seeds the generator of the int ``batches`` draws.
    """

    name = "stochastic_implicit"
    queries_keep_state = False  # (its state is its generator's draws)

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        solver_optimizer: Callable[[Tensors], torch.optim.Optimizer] | None = None,
        steps: int = 100,
        batches: int | Callable[[int], Batch] | None = None,
        cross: str = "minibatch",
        curvature: str = "hessian",
        ll_outputs: Outputs | None = None,
        solver_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        self.solver_optimizer = solver_optimizer
        self.steps = steps
        self.batches = batches
        self.cross = cross
        self.ll_outputs = ll_outputs
        self.curvature = curvature
        self.solver_scheduler = solver_scheduler
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def _check_curvature(self, value: Any) -> str:
        """One of ``CURVATURES``; ``"gauss_newton"`` only with ``ll_outputs``."""
        if value not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {value!r}.")
        _check_outputs_given(value, self._ll_outputs)
        return value

    def _check_ll_outputs(self, value: Any) -> Outputs | None:
        """Anything (it is called, and checked, where used); a callable with
        ``curvature="gauss_newton"``."""
        if "_curvature" in self.__dict__:
            _check_outputs_given(self._curvature, value)
        return value

    # may be set between UL steps, checked as at construction
    solver_optimizer = Setting(
        _check_callable,
        "params -> torch.optim.Optimizer, e.g. lambda params: torch.optim.SGD(params, lr=0.1)",
    )
    steps = Setting(_count, 1)
    batches = Setting(_check_batches)
    cross = Setting(_check_cross)
    ll_outputs = Setting(_check_ll_outputs, reads_object=True)
    curvature = Setting(_check_curvature, reads_object=True)
    solver_scheduler = Setting(_check_callable, "optimizer -> scheduler")
    seed = Fixed(
        "the generator of the minibatch draws was seeded with it at construction, and its "
        "state, the method's checkpointed state, goes on from there",
        _check_seed,
    )

    def differentiable_steps(self, iters: int) -> int:
        """None: the LL graph is not needed."""
        return 0

    @property
    def splits_ul_batch(self) -> bool:  # type: ignore[override]
        """The default solver (SGD on the quadratic, whose iterates are linear in ``v``) with
        the same draws on every process; a given solver optimizer may not be linear (Adam)."""
        return self._solver_optimizer is None

    def skip_task(self, train: Batch, val: Batch) -> None:
        """Advance the draws exactly as one task's hypergradient would, without computing it:
        ``steps`` draws, and one more for a minibatch cross term. Under ``torch.distributed``
        every process passes over the other processes' tasks of a task batch, so that each
        task gets the minibatches one process would draw for it, and every process ends the UL
        step with the same generator state (the one a single process would have)."""
        for _ in range(self._steps + (self._cross == "minibatch")):
            if callable(self._batches):  # the callable owns its randomness: only the count
                self.draws += 1
            else:
                self.draw(train)

    def check_against(self, ll: Any) -> None:
        """Also: the LL ends at a stationary point of ``ll_objective`` (not BDA with
        ``alpha > 0``, not a fixed-point map), whose Hessian is the system this method
        solves."""
        if not getattr(ll, "descends_objective", True):
            raise ValueError(FIXED_POINT_REFUSED)
        super().check_against(ll)
        if not getattr(ll, "solves_ll_objective", True):
            raise ValueError(
                "StochasticImplicit needs an LL run that ends at a stationary point of "
                f"ll_objective; {type(ll).__name__} aggregates the UL gradient into its steps "
                "(alpha > 0), so the implicit function theorem does not apply. Use Reverse or "
                "Truncated, or alpha=0."
            )
        refuse_rule_weight_decay(getattr(ll, "rule", None), "StochasticImplicit")

    def settings(self) -> dict[str, Any]:
        """Solver steps, batches, cross term, curvature and seed; and a given solver optimizer
        and scheduler, described by their types and hyperparameters as built on stand-ins for
        the solution (left out when not given, so that older checkpoints still resume).
        Reference: Grazzi, Pontil & Salzo (2021), AISTATS."""
        batches = "callable" if callable(self._batches) else self._batches
        settings: dict[str, Any] = {
            "steps": self._steps,
            "batches": batches,
            "cross": self._cross,
            "curvature": self._curvature,
            "seed": self.seed,
        }
        if self._solver_optimizer is not None or self._solver_scheduler is not None:
            settings.update(self._solver_settings())
        return settings

    def _solver_settings(self) -> dict[str, str]:
        """The given solver optimizer's and scheduler's types and hyperparameters, in words:
        built once on zero tensors shaped like the trainable LL weights (``"callable"`` where
        that fails; the run itself reports the error)."""

        def number(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                return value.item()
            if isinstance(value, tuple | list):
                return [number(v) for v in value]
            return value

        def described(obj: Any, values: Mapping[str, Any]) -> str:
            shown = (
                f"{k}={number(v)!r}"
                for k, v in sorted(values.items())
                if isinstance(number(v), int | float | str | bool | list | type(None))
            )
            return f"{type(obj).__name__}({', '.join(shown)})"

        out: dict[str, str] = {}
        try:
            q = [
                torch.zeros_like(p, requires_grad=True)
                for p in self.ll_model.parameters()
                if p.requires_grad
            ]
            # the default solver is SGD with the LL step size, which the runner records
            optimizer = torch.optim.SGD(q, lr=1.0)
            if self._solver_optimizer is not None:
                optimizer = self._solver(q, None)  # type: ignore[arg-type]
                out["solver_optimizer"] = "; ".join(
                    described(optimizer, {k: v for k, v in g.items() if k != "params"})
                    for g in optimizer.param_groups
                )
            if self._solver_scheduler is not None:
                scheduler = self._solver_scheduler(optimizer)
                out["solver_scheduler"] = described(scheduler, scheduler.state_dict())
        except Exception:
            for name in ("solver_optimizer", "solver_scheduler"):
                if getattr(self, name) is not None:
                    out[name] = "callable"
        return out

    def state_dict(self) -> dict[str, Any]:
        """The generator's state and the number of draws (the next draws follow from them)."""
        return {"generator": self.generator.get_state(), "draws": self.draws}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next draws are bitwise those that followed it."""
        try:
            generator, draws = state["generator"], int(state["draws"])
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"not a StochasticImplicit state (missing {error}); load what "
                "StochasticImplicit.state_dict() returned."
            ) from None
        self.generator.set_state(generator.cpu())
        self.draws = draws

    # -- minibatches ------------------------------------------------------------------------

    def draw(self, train: Batch) -> Batch:
        """The next minibatch of the LL batch ``train`` (itself when ``batches`` is None)."""
        draw, self.draws = self.draws, self.draws + 1
        if self._batches is None:
            return train
        if callable(self._batches):
            batch = self._batches(draw)
            if not isinstance(batch, tuple | list) or len(batch) != 2:
                raise TypeError(
                    f"batches({draw}) must return a pair (data, target), got "
                    f"{type(batch).__name__}."
                )
            return batch[0], batch[1]
        # the same rows of every tensor in (data, target), as the other methods' samplers
        data, target = train
        n = num_samples(data, target, "train", TAKE_AS_GIVEN)
        if self._batches >= n:
            return train
        index = torch.randperm(n, generator=self.generator)[: self._batches]
        return select(data, index), select(target, index)

    # -- products ---------------------------------------------------------------------------

    def _state(self, model: nn.Module, batch: Batch) -> dict[str, Any]:
        return make_state(batch[0], batch[1], self.ul_model, model)

    def _hessian_product(self, state: dict[str, Any], w: Tensors, q: Tensors) -> Tensors:
        loss = check_objective_result(self.ll_objective(state), "ll_objective")
        g = gradient_to_differentiate(loss, w, state["ll_model"], "StochasticImplicit")
        linked = [(gi, qi) for gi, qi in zip(g, q, strict=True) if gi is not None]
        linked = [(gi, qi) for gi, qi in linked if gi.requires_grad]
        if not linked:
            return [torch.zeros_like(x) for x in w]
        hv = torch.autograd.grad(
            [gi for gi, _ in linked], w, grad_outputs=[qi for _, qi in linked], allow_unused=True
        )
        return _or_zeros(hv, w)

    def _split(self, state: dict[str, Any], graph: bool = True) -> tuple[torch.Tensor, Any, Any]:
        """``ll_outputs(state)``, checked (``graph``: the outputs must have a graph)."""
        result = self._ll_outputs(state)
        if not isinstance(result, tuple | list) or len(result) != 3:
            got = type(result).__name__
            if isinstance(result, tuple | list):
                got += f" of length {len(result)}"
            raise TypeError(
                f"ll_outputs must return a tuple (outputs, output_loss, rest), got {got}."
            )
        outputs, output_loss, rest = result
        if not isinstance(outputs, torch.Tensor) or (graph and not outputs.requires_grad):
            raise TypeError(
                "ll_outputs' outputs must be a tensor computed from state['ll_model'] (with its "
                "graph to the LL weights)."
            )
        if not callable(output_loss):
            raise TypeError("ll_outputs' output_loss must be a callable outputs -> scalar.")
        if isinstance(rest, bool) or not isinstance(rest, torch.Tensor | int | float):
            raise TypeError("ll_outputs' rest must be a scalar tensor or a number (0.0).")
        return outputs, output_loss, rest

    def _gauss_newton_product(self, state: dict[str, Any], w: Tensors, q: Tensors) -> Tensors:
        refuse_broken_weight_norm(state["ll_model"])
        outputs, output_loss, rest = self._split(state)
        # J q by the double-backward trick: J^T u is linear in u, so d(J^T u . q)/du = J q
        refuse_once_differentiable(outputs, w, "StochasticImplicit", "ll_outputs' outputs")
        u = torch.zeros_like(outputs, requires_grad=True)
        jtu = torch.autograd.grad(outputs, w, grad_outputs=u, create_graph=True, allow_unused=True)
        linked = [(a, qi) for a, qi in zip(jtu, q, strict=True) if a is not None]
        out = [torch.zeros_like(x) for x in w]
        if linked:
            (jq,) = torch.autograd.grad(
                [a for a, _ in linked], u, grad_outputs=[qi for _, qi in linked], allow_unused=True
            )
            if jq is not None:
                z = outputs.detach().requires_grad_()
                loss = check_objective_result(output_loss(z), "ll_outputs' output_loss")
                refuse_once_differentiable(
                    loss, [z], "StochasticImplicit", "ll_outputs' output_loss"
                )
                (gz,) = torch.autograd.grad(loss, z, create_graph=True)
                hq = torch.zeros_like(z)
                if gz.requires_grad:
                    (hq,) = torch.autograd.grad(gz, z, grad_outputs=jq, allow_unused=True)
                    hq = torch.zeros_like(z) if hq is None else hq
                jthq = torch.autograd.grad(outputs, w, grad_outputs=hq, allow_unused=True)
                out = _or_zeros(jthq, w)
        if isinstance(rest, torch.Tensor) and rest.requires_grad:
            rest = check_objective_result(rest, "ll_outputs' rest")
            refuse_once_differentiable(rest, w, "StochasticImplicit", "ll_outputs' rest")
            out = [a + b for a, b in zip(out, self._second(rest, w, q), strict=True)]
        return out

    @staticmethod
    def _second(value: torch.Tensor, w: Tensors, q: Tensors) -> Tensors:
        g = torch.autograd.grad(value, w, create_graph=True, allow_unused=True)
        linked = [(gi, qi) for gi, qi in zip(g, q, strict=True) if gi is not None]
        linked = [(gi, qi) for gi, qi in linked if gi.requires_grad]
        if not linked:
            return [torch.zeros_like(x) for x in w]
        hv = torch.autograd.grad(
            [gi for gi, _ in linked], w, grad_outputs=[qi for _, qi in linked], allow_unused=True
        )
        return _or_zeros(hv, w)

    def _check_split(self, model: nn.Module, train: Batch) -> None:
        """``ll_objective == output_loss(outputs) + rest`` on the full batch, to ``sqrt(eps)`` of
        the size of the terms compared (at any loss scale).
        Both sides make the same random draws (dropout, noise in the objective), and the
        check leaves the global RNG where it was."""
        draws = capture_draws(self.ul_params[0].device)
        with torch.no_grad():
            state = self._state(model, train)
            with replay_draws(draws):
                outputs, output_loss, rest = self._split(state, graph=False)
                loss = output_loss(outputs)
            with replay_draws(draws):
                whole = self.ll_objective(state)
        # the floor is relative to the terms compared (no absolute term): a wrong split is
        # refused at any loss scale, and sqrt(eps) of them leaves room for the same loss
        # computed by other operations in ll_objective and output_loss
        split = loss + rest
        size = float(abs(loss) + abs(rest) + abs(whole))
        gap = float((split - whole).abs())
        if not gap <= math.sqrt(torch.finfo(whole.dtype).eps) * size:
            raise ValueError(
                f"ll_outputs does not split ll_objective: output_loss(outputs) + rest = "
                f"{float(split):.6g} but ll_objective = {float(whole):.6g} on the LL batch. "
                "Return every term of ll_objective that is not a loss of the outputs as rest "
                "(weight penalties, proximal terms), and compute the terms with the same "
                "operations as ll_objective (round-off up to sqrt(eps) of their size is allowed)."
            )

    # -- the method -------------------------------------------------------------------------

    def _solver(self, q: Tensors, trajectory: Trajectory) -> torch.optim.Optimizer:
        if self._solver_optimizer is None:
            step = trajectory.step_size
            if step is None:
                raise ValueError(
                    "StochasticImplicit's default solver is SGD with the LL step size, which is "
                    "not one number here (per-parameter or per-step step sizes): pass "
                    "solver_optimizer=lambda params: torch.optim.SGD(params, lr=<alpha>) with "
                    "alpha < 2 / lambda_max(H)."
                )
            return torch.optim.SGD(q, lr=step)
        optimizer = self._solver_optimizer(q)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "solver_optimizer must return a torch.optim.Optimizer over the params it is "
                f"given, got {type(optimizer).__name__}."
            )
        return optimizer

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        step_map = getattr(call.trajectory, "step_map", None)
        if not getattr(step_map, "symmetric", True):
            raise ValueError(FIXED_POINT_REFUSED)
        model = call.auxiliary_model
        train = (call.train_data, call.train_target)
        weights, active = detached_weights(call.trajectory)
        w = [weights[i] for i in active]
        n = len(self.ul_params)
        product = (
            self._hessian_product if self._curvature == "hessian" else self._gauss_newton_product
        )
        with evaluate_at(model, weights):
            if self._curvature == "gauss_newton":
                self._check_split(model, train)
            loss = self.ul_loss(call)
            grads = torch.autograd.grad(loss, [*self.ul_params, *w], allow_unused=True)
            direct, v = grads[:n], _or_zeros(grads[n:], w)
            q = [torch.zeros_like(x, requires_grad=True) for x in w]
            optimizer = self._solver(q, call.trajectory)
            scheduler = (
                None if self._solver_scheduler is None else self._solver_scheduler(optimizer)
            )
            with _frozen(self.ul_params):
                for _ in range(self._steps):
                    state = self._state(model, self.draw(train))
                    hq = product(state, w, [qi.detach() for qi in q])
                    for qi, h, vi in zip(q, hq, v, strict=True):
                        qi.grad = h - vi
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
            residual = [qi.grad for qi in q]  # H_b q - v at the last step's q
            cross = self.draw(train) if self._cross == "minibatch" else train
            ll_loss = check_objective_result(
                self.ll_objective(self._state(model, cross)), "ll_objective"
            )
            g = gradient_to_differentiate(ll_loss, w, model, "StochasticImplicit")
        solution = [qi.detach() for qi in q]
        self._check_solution(solution, residual, v)
        linked = [(gi, qi) for gi, qi in zip(g, solution, strict=True) if gi is not None]
        linked = [(gi, qi) for gi, qi in linked if gi.requires_grad]
        indirect: tuple = (None,) * n
        if linked:
            indirect = torch.autograd.grad(
                [gi for gi, _ in linked],
                self.ul_params,
                grad_outputs=[qi for _, qi in linked],
                allow_unused=True,
            )
        result = [
            d if ind is None else (-ind if d is None else d - ind)
            for d, ind in zip(direct, indirect, strict=True)
        ]
        return result, loss

    def _check_solution(self, q: Tensors, residual: Tensors, v: Tensors) -> None:
        """Raise if the solve diverged: ``q`` not finite, or the last step's residual above
        ``DIVERGED`` (100) times that of ``q = 0`` (``||v||``). SGD on the quadratic with a
        step above ``2 / lambda_max`` grows it geometrically (10% per step left the
        hypergradient 1400 times off under the earlier alarm, ``1e6 ||v||``); minibatch
        noise, momentum and a truncated series on an indefinite ``H`` (which is what the
        method computes) leave it far below (at most ``3.9 ||v||`` in the tests)."""
        values = torch.stack([linalg.norm(q), linalg.norm(residual), linalg.norm(v)]).tolist()
        q_norm, res, rhs = values
        self.diagnostics = {
            "steps": self._steps,
            "draws": self.draws,
            "q_norm": q_norm,
            "minibatch_residual_norm": res,
            "rhs_norm": rhs,
        }
        if math.isfinite(q_norm) and math.isfinite(res) and res <= DIVERGED * max(rhs, 1e-300):
            return
        raise HypergradientDivergenceError(
            f"The stochastic linear solve diverged: ||q|| = {q_norm:.3g}, last minibatch "
            f"residual {res:.3g}, over {DIVERGED:g} times ||v|| = {rhs:.3g} (that of q = 0). SGD "
            "on the quadratic converges only for a step below 2 / lambda_max of the minibatch "
            "Hessians (small minibatches have larger ones): lower the solver's learning rate, "
            "use larger batches, or curvature='gauss_newton' where the LL Hessian is not "
            "positive definite."
        )

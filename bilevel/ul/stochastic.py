"""What the stochastic bilevel methods (SOBA, SABA, StocBiO, AmIGO) share: the LL variable
kept in ``ll_model`` across UL steps, minibatch oracles (gradients, Hessian-vector and cross
products on a drawn minibatch), the checks on the LL optimizer that supplies the step sizes,
and the per-step bookkeeping (finiteness, commit, ``.grad``, checkpoint state).

Notation (Dagréou et al. 2022): ``G(y, x)`` is the LL objective on the train data, ``F(y, x)``
the UL objective on the validation data, ``y`` the LL variable (the trainable parameters of
``ll_model``), ``x`` the UL parameters and ``v`` the auxiliary variable of the linear system
``H v = -grad_y F`` with ``H = grad_yy G``. The hypergradient is
``grad_x F + grad_xy G v`` at ``v = -H^{-1} grad_y F``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bilevel.linalg import power_iteration
from bilevel.ll import evaluate_at
from bilevel.roundoff import loss_grew
from bilevel.second_derivatives import gradient_to_differentiate
from bilevel.settings import Fixed
from bilevel.state import (
    LowerLevelDivergenceError,
    Objective,
    all_finite,
    capture_draws,
    check_objective_result,
    make_state,
    parameter_names,
    replay_draws,
)
from bilevel.ul.base import (
    Call,
    Grads,
    HypergradientCalculator,
    check_ll_parameters,
    refuse_other_dynamics,
)
from bilevel.ul.ll_growth import RisingLoss, divergence_message
from bilevel.ul.sampling import SAME, Minibatch, Sampler, num_samples, select
from bilevel.user_warnings import warn_user

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class LLStep:
    """A single-loop method's LL step, as :meth:`StochasticMethod.finish` confirms a suspect
    growth with it: the LL optimizer ``ll``, the LL variable ``y`` before the step, the train
    ``minibatch`` and its ``batch`` (data, target), and the step size ``lr``."""

    ll: Any
    y: list[torch.Tensor]
    minibatch: Minibatch
    batch: tuple[Any, Any]
    lr: float


def dense(like: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> Tensors:
    """``grads`` with zeros (shaped like ``like``) where a gradient is ``None`` (no path)."""
    return [torch.zeros_like(p) if g is None else g for p, g in zip(like, grads, strict=True)]


class StochasticMethod(HypergradientCalculator):
    """Base of the stochastic methods that keep the LL variable (and an auxiliary variable)
    alive across UL steps and draw their own minibatches.

    The LL variable ``y`` is ``ll_model``'s trainable parameters themselves: every UL step
    moves them in place (so ``ll_model`` holds the current LL iterate, and the runner's
    checkpoint of ``ll_model`` saves it). :meth:`task_gradients` is one iteration of the
    method: it draws minibatches from the full ``train`` and ``val`` data with
    its ``sampler``, updates ``y`` (and ``v``), adds the UL direction to ``.grad`` of the UL
    parameters and returns the minibatch UL and LL losses. The UL step itself is the UL
    optimizer's (``torch.optim.SGD(lr=gamma)`` is the papers' update). Every
    :meth:`task_gradients` call (every :meth:`bilevel.BilevelProblem.step`) advances the
    state; :meth:`bilevel.BilevelProblem.hypergradient` is a query that puts it back, so a
    loop of ``hypergradient`` and ``ul_optimizer.step()`` would never move ``y``: to clip the
    direction, give ``BilevelProblem(..., before_ul_step=)``.

    The LL optimizer ``ll`` (a :class:`bilevel.ll.GradientDescent`) supplies the LL step size
    ``ll.lr`` (a positive number; plain SGD without momentum or weight decay) and, for the
    methods with inner loops, their length ``ll.iters``. Objectives are taken to be means over
    the samples of their batch (a minibatch's loss is then an estimate of the full one).

    One task per UL step: the LL variable is one per method (and per process), so a
    meta-batch of several tasks (``meta_step``) would move it once per task, and under
    ``torch.distributed`` each process would move its own copy.

    Args:
        ul_objective: ``state -> scalar`` UL loss ``F``.
        ul_model: module with the UL variables ``x`` (not LL parameters).
        ll_objective: ``state -> scalar`` LL loss ``G``.
        ll_model: the LL module; its trainable parameters are ``y``.
        batch_size: samples per train minibatch; ``None``: the data as given at every call
            (the full data set, for the deterministic steps, or minibatches the caller draws
            itself); used to build the default :class:`~bilevel.ul.sampling.Sampler`.
        val_batch_size: samples per validation minibatch (``"same"``: ``batch_size``).
        seed: seeds the default sampler's generator.
        sampler: a :class:`~bilevel.ul.sampling.Sampler` (or subclass) to use instead; then
            ``batch_size``, ``val_batch_size`` and ``seed`` are not given.
    """

    #: one LL state moves across UL steps: the runner refuses task batches and processes
    #: that would each move it
    keeps_ll_state = True

    name = "stochastic"
    #: whether ``ll.iters`` is the length of an inner loop (else it must be 1)
    inner_loop = False

    sampler = Fixed(
        "it holds the generator and the split of the data into batches that the method's "
        "state (and its checkpoints) continue from"
    )

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        batch_size: int | None = 64,
        val_batch_size: int | str | None = SAME,
        seed: int = 0,
        sampler: Sampler | None = None,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        pairs = zip(self.ul_params, self.initial_weight_of, strict=True)
        shared = [p for p, j in pairs if j is not None]
        if shared:
            names = parameter_names(ul_model, shared)
            raise ValueError(
                f"UL parameter(s) {names} are also parameters of ll_model: {type(self).__name__} "
                "keeps the LL variable in ll_model and moves it at every step, so it cannot also "
                "be a UL variable (an initialization to meta-learn). Use Reverse, FirstOrder or "
                "Reptile for that."
            )
        if sampler is None:
            sampler = Sampler(batch_size, val_batch_size, seed)
        else:
            if not isinstance(sampler, Sampler):
                raise TypeError(
                    f"sampler must be a bilevel.ul.sampling.Sampler (or a subclass), got "
                    f"{type(sampler).__name__}."
                )
            if batch_size != 64 or val_batch_size != SAME or seed != 0:
                raise TypeError(
                    "batch_size, val_batch_size and seed were given beside sampler: give them "
                    "to the Sampler."
                )
        self.sampler = sampler
        #: ll_model's parameters and which of them are ``y`` (fixed here, as ``ll_trainable``)
        self._ll_params = list(ll_model.parameters())
        self._all_trainable = len(self._ll_params) == len(self.ll_trainable)
        #: UL iterations taken (the step counter of the step-size schedules)
        self.t = 0
        #: the linear-system variable (``None`` until the first step)
        self.v: Tensors | None = None
        #: the LL loss across UL steps, for single-loop methods' growth check (``finish``)
        self.rising = RisingLoss()
        self._warned_growth = False

    # --- settings, checks, state -----------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The method's and its sampler's settings (a checkpoint must agree on them)."""
        return dict(self.sampler.settings())

    def differentiable_steps(self, iters: int) -> int:
        """None: the method takes its own LL steps, without an LL graph."""
        return 0

    def check_against(self, ll: Any) -> None:
        """Raise if ``ll`` cannot supply this method's LL steps (see the class docstring)."""
        refuse_other_dynamics(ll, type(self).__name__)
        super().check_against(ll)
        for attr in ("patched_model", "release", "lr", "iters"):
            if not hasattr(ll, attr):
                raise TypeError(
                    f"{type(self).__name__} needs a bilevel.ll.GradientDescent as ll, got "
                    f"{type(ll).__name__}."
                )
        self.ll_lr(ll)
        hyper = getattr(ll, "hyper", {})
        extra = [
            name
            for name in ("momentum", "weight_decay", "dampening")
            if name in hyper
            and any(not (isinstance(v, float) and v == 0.0) for v in hyper[name].items)
        ]
        rule = getattr(ll, "optimizer", "sgd")
        if rule != "sgd" or extra:
            what = f"optimizer={rule!r}" if rule != "sgd" else ", ".join(extra)
            raise ValueError(
                f"{type(self).__name__} takes plain SGD steps on the LL (the paper's update), "
                f"but the LL optimizer has {what}. Build GradientDescent(..., optimizer='sgd') "
                "without momentum or weight decay."
            )
        if not self.inner_loop and ll.iters != 1:
            raise ValueError(
                f"{type(self).__name__} takes one LL step per UL step (the LL variable, v and "
                f"the UL variable move together), but ll.iters = {ll.iters}. Build "
                "GradientDescent(..., iters=1)."
            )

    def ll_lr(self, ll: Any) -> float:
        """``ll.lr`` as a number, or a clear error (and dynamics whose steps this method
        would silently replace by its own SGD steps refused)."""
        refuse_other_dynamics(ll, type(self).__name__)
        lr = ll.lr
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr):
            raise TypeError(
                f"{type(self).__name__} takes its LL step size from ll.lr, which must be one "
                f"finite number, got {lr!r}. Build GradientDescent(..., lr=0.1); step-size "
                "schedules are the method's own (e.g. SOBA's ll_decay)."
            )
        if lr <= 0:
            raise ValueError(f"ll.lr must be > 0, got {lr}.")
        return float(lr)

    def state_dict(self) -> dict[str, Any]:
        """The step counter, ``v``, the sampler's state and the method's own state (tensors
        and plain values; the LL variable is ``ll_model``, saved by the runner)."""
        return self._state(None if self.v is None else [t.detach().clone() for t in self.v])

    def state_at_step_start(self) -> dict[str, Any]:
        """:meth:`state_dict` with ``v`` shared: a step replaces it (:meth:`commit_state`)."""
        return self._state(self.v)

    def _state(self, v: Tensors | None) -> dict[str, Any]:
        sampler = self.sampler.state_dict()
        extra = self._extra_state()
        return {"t": self.t, "v": v, "sampler": sampler, "ll_growth": self.rising.state(), **extra}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors go to the LL parameters' device and dtype)."""
        if not isinstance(state, Mapping) or "t" not in state or "sampler" not in state:
            raise ValueError(
                f"not a {type(self).__name__} state: load what {type(self).__name__}.state_dict() "
                "returned (a checkpoint of the same method)."
            )
        v = state.get("v")
        self.v = None if v is None else self._like(v, self.ll_trainable, "v")
        self.sampler.load_state_dict(state["sampler"])
        self._load_extra_state(state)
        self.rising.load(state.get("ll_growth"))
        self.t = int(state["t"])

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def _like(
        self, saved: Sequence[torch.Tensor], params: Sequence[torch.Tensor], what: str
    ) -> Tensors:
        shapes = [tuple(p.shape) for p in params]
        if len(saved) != len(params) or any(
            tuple(s.shape) != shape for s, shape in zip(saved, shapes, strict=True)
        ):
            raise ValueError(
                f"the saved {what} has shapes {[tuple(s.shape) for s in saved]}, but the model "
                f"needs {shapes}: the checkpoint is of another model."
            )
        return [s.to(device=p.device, dtype=p.dtype) for s, p in zip(saved, params, strict=True)]

    # --- the calculator path does not apply ------------------------------------------------

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        raise TypeError(
            f"{type(self).__name__} keeps its own LL variable and draws its own minibatches: "
            "drive it with BilevelProblem(ll, method, ul_optimizer).step(train, val) (or "
            "method.task_gradients(ll, train, val)), not with an auxiliary model."
        )

    # --- minibatches and oracles -----------------------------------------------------------

    def draw(self, level: str, pair: tuple[Any, Any]) -> tuple[Minibatch, tuple[Any, Any]]:
        """The next minibatch of ``level`` from the full ``(data, target)``."""
        data, target = pair
        if self.sampler.batch_sizes.get(level, 1) is None:  # the data as given: no rows needed
            return Minibatch(None, 0, 1, 1.0), (data, target)
        batch = self.sampler.draw(level, num_samples(data, target, level))
        return batch, (select(data, batch.index), select(target, batch.index))

    def leaves(self) -> Tensors:
        """The current LL variable, as new leaves that require grad (refused if ``ll_model``'s
        trainable parameters are no longer those the method was built with)."""
        check_ll_parameters(self, self.ll_trainable)
        return [p.detach().clone().requires_grad_(True) for p in self.ll_trainable]

    def _weights(self, y: Sequence[torch.Tensor]) -> Tensors:
        if self._all_trainable:
            return list(y)
        it = iter(y)
        return [next(it) if p.requires_grad else p.detach() for p in self._ll_params]

    def _loss(
        self,
        objective: Objective,
        what: str,
        model: nn.Module,
        y: Tensors,
        batch: Any,
        weight: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective at ``y`` on ``batch``: (its value, the value times ``weight``)."""
        with evaluate_at(model, self._weights(y)):
            loss = check_objective_result(objective(make_state(*batch, self.ul_model, model)), what)
        return loss, loss if weight == 1.0 else loss * weight

    def _ll_grad(
        self, model: nn.Module, y: Tensors, mb: Minibatch, batch: Any, create_graph: bool
    ) -> tuple[torch.Tensor, Tensors]:
        loss, scaled = self._loss(self.ll_objective, "ll_objective", model, y, batch, mb.weight)
        if create_graph:  # for Hessian-vector and cross products
            grads = gradient_to_differentiate(scaled, y, model, type(self).__name__)
        else:
            grads = torch.autograd.grad(scaled, y, allow_unused=True)
        if any(g is None for g in grads):
            names = parameter_names(
                self.ll_model,
                [p for p, g in zip(self.ll_trainable, grads, strict=True) if g is None],
            )
            raise ValueError(
                f"ll_objective does not depend on ll_model parameter(s) {names}: they would "
                "never move. Use them in ll_objective or freeze them with requires_grad_(False)."
            )
        return loss.detach(), list(grads)

    def ll_gradient(
        self, model: nn.Module, y: Tensors, mb: Minibatch, batch: Any
    ) -> tuple[torch.Tensor, Tensors]:
        """LL loss and ``grad_y G`` on a minibatch (one gradient)."""
        return self._ll_grad(model, y, mb, batch, create_graph=False)

    def ll_products(
        self,
        model: nn.Module,
        y: Tensors,
        mb: Minibatch,
        batch: Any,
        vector: Tensors,
        hessian: bool = True,
        cross: bool = True,
    ) -> tuple[torch.Tensor, Tensors, Tensors | None, Grads | None]:
        """LL loss, ``grad_y G``, ``grad_yy G @ vector`` and ``grad_xy G @ vector`` (``None``
        for a UL parameter that ``G`` does not depend on) on one minibatch: one gradient with
        its graph, then one backward pass through it for both products."""
        loss, grads = self._ll_grad(model, y, mb, batch, create_graph=True)
        hv, cv = self.products(y, grads, vector, hessian=hessian, cross=cross)
        return loss, [g.detach() for g in grads], hv, cv

    def products(
        self,
        y: Tensors,
        grads: Tensors,
        vector: Tensors,
        hessian: bool = True,
        cross: bool = True,
        retain_graph: bool = False,
    ) -> tuple[Tensors | None, Grads | None]:
        """``(grad_yy G @ vector, grad_xy G @ vector)`` from ``grads = grad_y G`` taken with its
        graph; either may be skipped; ``retain_graph``: keep the graph for more products."""
        inputs = (list(y) if hessian else []) + (list(self.ul_params) if cross else [])
        pairs = [(g, u) for g, u in zip(grads, vector, strict=True) if g.requires_grad]
        if pairs:
            out = torch.autograd.grad(
                [g for g, _ in pairs],
                inputs,
                grad_outputs=[u for _, u in pairs],
                retain_graph=retain_graph,
                allow_unused=True,
            )
        else:  # G is linear in y: no second derivatives at all
            out = (None,) * len(inputs)
        k = len(y) if hessian else 0
        hv = None
        if hessian:
            hv = dense(y, out[:k])
        return hv, (list(out[k:]) if cross else None)

    def hvp(
        self, model: nn.Module, y: Tensors, mb: Minibatch, batch: Any, vector: Tensors
    ) -> Tensors:
        """``grad_yy G @ vector`` on a minibatch (one Hessian-vector product)."""
        _, grads = self._ll_grad(model, y, mb, batch, create_graph=True)
        hv, _ = self.products(y, grads, vector, cross=False)
        return hv

    def cross(
        self, model: nn.Module, y: Tensors, mb: Minibatch, batch: Any, vector: Tensors
    ) -> Grads:
        """``grad_xy G @ vector`` on a minibatch (one cross product)."""
        _, grads = self._ll_grad(model, y, mb, batch, create_graph=True)
        _, cv = self.products(y, grads, vector, hessian=False)
        return cv

    def ul_gradients(
        self, model: nn.Module, y: Tensors, mb: Minibatch, batch: Any
    ) -> tuple[torch.Tensor, Tensors, Grads]:
        """UL loss, ``grad_y F`` (zeros where ``F`` does not depend on ``y``) and
        ``grad_x F`` (``None`` where it does not depend on ``x``) on a minibatch."""
        loss, scaled = self._loss(self.ul_objective, "ul_objective", model, y, batch, mb.weight)
        grads = torch.autograd.grad(scaled, [*y, *self.ul_params], allow_unused=True)
        fy = dense(y, grads[: len(y)])
        return loss.detach(), fy, list(grads[len(y) :])

    def inner_sgd(
        self, ll: Any, model: nn.Module, y: Tensors, train: tuple[Any, Any], lr: float
    ) -> tuple[Tensors, torch.Tensor, LLStep]:
        """``ll.iters`` SGD steps on the LL from ``y`` (warm start), a new train minibatch
        each: the final LL variable (new leaves), the LL loss at every step (one tensor,
        checked later in one sync) and the last step, with which :meth:`finish` confirms an
        LL loss that grows across UL steps."""
        losses = y[0].new_empty(ll.iters, dtype=y[0].dtype.to_real())  # real for complex y
        for s in range(ll.iters):
            mb, batch = self.draw("train", train)
            losses[s], grads = self.ll_gradient(model, y, mb, batch)
            last = LLStep(ll, y, mb, batch, lr)
            with torch.no_grad():
                y = [w - lr * g for w, g in zip(y, grads, strict=True)]
            y = [w.requires_grad_(True) for w in y]
        return y, losses, last

    def initial_v(self) -> Tensors:
        """``v`` (zeros at the first step)."""
        if self.v is None:
            self.v = [
                torch.zeros_like(p, memory_format=torch.contiguous_format)
                for p in self.ll_trainable
            ]
        return self.v

    # --- the end of a step -----------------------------------------------------------------

    def direction(self, fx: Grads, cv: Grads, sign: float) -> Tensors:
        """``fx + sign * cv`` per UL parameter; refuses UL parameters reached by neither."""
        out: Grads = []
        for f, c in zip(fx, cv, strict=True):
            if c is None:
                out.append(f)
            elif f is None:
                out.append(c if sign == 1.0 else -c)
            else:
                out.append(f + c if sign == 1.0 else f - c)
        self._refuse_unused(out)
        return out  # type: ignore[return-value]

    def finish(
        self,
        ll_loss: torch.Tensor,
        ul_loss: torch.Tensor,
        direction: Tensors,
        y: Tensors,
        v: Tensors | None,
        scale: float = 1.0,
        losses: torch.Tensor | None = None,
        commit: Callable[[], None] | None = None,
        step: LLStep | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the step (one host sync), add ``scale * direction`` to ``.grad`` of the UL
        parameters and commit (:meth:`commit_state`) ``y`` to ``ll_model``, ``v``, the count
        of steps and ``commit`` (the method's own state update).

        Nothing is changed when a value is not finite (but the sampler has moved on; the
        runner puts it back unless it skips the step): the step raises
        ``FloatingPointError`` naming the cause (the runner's ``on_nonfinite="skip"`` then
        skips a step that left the state as it was). A single-loop method gives its LL
        ``step``: an LL loss that grows across UL steps is then checked
        (:mod:`bilevel.ul.ll_growth`; :class:`~bilevel.ll.LowerLevelDivergenceError`, or a
        warning, as the LL optimizer's ``on_growth`` says)."""
        direction = [d.detach() if d.requires_grad else d for d in direction]
        y = [w.detach() if w.requires_grad else w for w in y]
        checked = [ll_loss, ul_loss, *direction, *y, *(v or [])]
        if losses is not None:
            checked.append(losses)
        if not all_finite(checked):
            raise FloatingPointError(self._nonfinite(ll_loss, ul_loss, direction, y, v, losses))
        value, cleared = None, False
        policy = None if step is None else step.ll.on_growth
        if policy == "raise" or (policy == "warn" and not self._warned_growth):
            value = float(ll_loss)  # (synchronized already, by the check above)
            if self.rising.suspect(value):
                cleared = self._confirm_growth(step, value, policy)

        def change() -> None:
            if value is not None:
                self.rising.record(value, cleared)
            with torch.no_grad():
                for p, w in zip(self.ll_trainable, y, strict=True):
                    p.copy_(w)
            if v is not None:
                self.v = [u.detach() for u in v]
            if commit is not None:
                commit()
            self.t += 1

        self.commit_state(change)
        for p, d in zip(self.ul_params, direction, strict=True):
            d = d if scale == 1.0 else d * scale
            if p.grad is None:
                p.grad = d.clone()
            else:
                p.grad.add_(d)
        self.diagnostics["ul_loss"] = ul_loss
        return ul_loss, ll_loss

    def _confirm_growth(self, step: LLStep, loss: float, policy: str) -> bool:
        """Raise (``policy="raise"``) or warn once (``"warn"``) if the LL step is too large
        for the curvature of the step's train minibatch at this UL point: this UL step's LL
        loss ``loss`` is suspect (:class:`~bilevel.ul.ll_growth.RisingLoss`). Returns whether
        the suspicion was cleared (the step is stable there)."""
        evidence = self._step_too_large(step)
        if evidence is None:
            return True  # the rises came from the UL side or the minibatches
        peak = self.rising.peak or 0.0
        message = divergence_message(type(self).__name__, self.t, loss, peak, evidence)
        if policy == "warn":
            self._warned_growth = True
            warn_user(message, RuntimeWarning)
            return False
        raise LowerLevelDivergenceError(message, first=peak, last=loss, iters=1)

    def _step_too_large(self, step: LLStep) -> str | None:
        """What shows the LL step ``step.lr`` too large at the step's UL point and train
        minibatch, in words, or ``None``: one SGD step raises the minibatch's LL loss beyond
        ``step.ll.growth_tolerance`` (and round-off), or the largest eigenvalue of its
        Hessian (20 power iterations, which approach it from below) is above
        ``2 / step.lr``. Both losses make the same random draws (dropout: one function
        compared at two points), and the generators are left as they were."""
        lr, y = step.lr, step.y
        model = step.ll.patched_model(graph_from_start=False)
        try:
            with replay_draws(capture_draws(y[0].device)) as draws:
                before, grads = self._ll_grad(model, y, step.minibatch, step.batch, True)
                with torch.no_grad():
                    moved = [(w - lr * g).requires_grad_() for w, g in zip(y, grads, strict=True)]
                draws.rewind()
                after = self._loss(self.ll_objective, "ll_objective", model, moved, step.batch, 1.0)
                first, last = float(before), float(after[0].detach())
                if loss_grew(first, last, step.ll.growth_tolerance, before.dtype):
                    return (
                        f"one SGD step of the LL step size {lr:.4g} raises this step's train "
                        f"minibatch's LL loss from {first:.4g} to {last:.4g}"
                    )
                if not any(g.requires_grad for g in grads):
                    return None  # a loss linear in y: no curvature
                hessian = self.products  # (the gradient's graph is kept for the 20 products)

                def hvp(vector: Tensors) -> Tensors:
                    return hessian(y, grads, vector, cross=False, retain_graph=True)[0]

                lambda_max = float(power_iteration(hvp, y))
        finally:
            step.ll.release(model)
        if lambda_max * lr > 2.0:
            return (
                f"the largest eigenvalue of this step's train minibatch's LL Hessian is at least "
                f"{lambda_max:.4g} (power iteration), above 2 / the LL step size {lr:.4g} = "
                f"{2.0 / lr:.4g}"
            )
        return None

    def _nonfinite(
        self,
        ll_loss: torch.Tensor,
        ul_loss: torch.Tensor,
        direction: Tensors,
        y: Tensors,
        v: Tensors | None,
        losses: torch.Tensor | None,
    ) -> str:
        where = f"{type(self).__name__} step {self.t}"
        if not all_finite([ll_loss] + ([losses] if losses is not None else [])):
            cause = "the LL loss is not finite"
        elif not all_finite(y):
            cause = "the LL variable diverged"
        elif v is not None and not all_finite(v):
            cause = "the linear-system variable v diverged"
        elif not all_finite([ul_loss]):
            cause = "the UL loss is not finite"
        else:
            cause = "the UL direction is not finite"
        return (
            f"{where}: {cause}; the state was left as it was before this step. Lower the LL "
            "step size ll.lr (it must be below 2 / the largest curvature of every minibatch's "
            "LL loss), lower the UL learning rate, or check the data and objectives for NaN."
        )

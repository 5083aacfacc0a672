"""Differentiable lower-level gradient descent (SGD, momentum, Adam) through ``higher``."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import higher
import torch
from torch import nn

from bilevel.ll.rules import RULES, Rule
from bilevel.ll.unroll import Unroll, install
from bilevel.state import (
    Objective,
    all_finite,
    check_data_matches,
    check_same_device_and_dtype,
    parameter_names,
    trainable_parameters,
)

Hyper = float | torch.Tensor | Sequence[float | torch.Tensor]


def _check_hyper(
    value: Any, name: str, iters: int, n_params: int, low: float, high: float, closed_low: bool
) -> Any:
    """Validate a hyperparameter given as a number, a 0-d tensor, a per-step schedule (1-d
    tensor of length ``iters``) or a per-parameter list of those; return it normalized."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    if isinstance(value, list | tuple) and len(items) != n_params:
        raise ValueError(
            f"{name} is a sequence of {len(items)} values, but the LL model has {n_params} "
            "trainable parameter tensors: give one value per tensor, or a single value."
        )
    checked = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | float | torch.Tensor):
            raise TypeError(
                f"{name} must be a float, a tensor or a list of them, got {type(item).__name__}."
            )
        if isinstance(item, torch.Tensor):
            if item.ndim > 1 or (item.ndim == 1 and item.shape[0] != iters):
                raise ValueError(
                    f"{name} tensor has shape {tuple(item.shape)}; expected a scalar or a "
                    f"per-step schedule of shape ({iters},)."
                )
            if not item.is_floating_point():
                raise TypeError(f"{name} tensor must be floating point, got {item.dtype}.")
        else:
            item = float(item)
        values = torch.as_tensor(item).detach()
        low_ok = bool((values >= low).all()) if closed_low else bool((values > low).all())
        if not (low_ok and bool((values < high).all()) and bool(torch.isfinite(values).all())):
            interval = f"{'[' if closed_low else '('}{low}, {high})"
            raise ValueError(f"{name} must lie in {interval}, got {values.tolist()}.")
        checked.append(item)
    return checked if isinstance(value, list | tuple) else checked[0]


def _at(value: Any, step: int, index: int, detach: bool) -> Any:
    """The value of a hyperparameter for one parameter tensor at one step."""
    if isinstance(value, list):
        value = value[index]
    if isinstance(value, torch.Tensor):
        if value.ndim == 1:
            value = value[step]
        if detach:
            value = value.detach()
    return value


class GradientDescent:
    """Differentiable lower-level optimizer: ``iters`` steps of SGD, momentum or Adam.

    The steps run on a ``higher``-patched copy of ``ll_model`` whose fast weights start from
    ``ll_model``'s weights. The learning rate, momentum and Adam's betas may be UL tensors
    (a scalar, a per-step schedule of shape ``(iters,)``, or one per LL parameter tensor), so
    that they receive a hypergradient.

    How much of the trajectory keeps a graph is set by ``differentiable_steps``: ``None``
    (all steps; needed by ``Reverse``), ``K`` (the last K; ``Truncated``) or ``0`` (none:
    ``Implicit``, ``FirstOrder``; memory then does not grow with ``iters``).
    :class:`bilevel.BilevelProblem` sets it from the UL calculator.

    Steps that keep no graph are cheap: they update the fast weights in place, and while they
    run the UL model's parameters have ``requires_grad`` switched off (restored afterwards,
    also on error), so that the LL objective records no graph to them. An LL objective
    therefore must not rely on ``requires_grad`` of the UL parameters.

    References: Maclaurin, Duvenaud & Adams (2015); Franceschi et al. (2017), "Forward and
    Reverse Gradient-Based Hyperparameter Optimization", ICML; Grefenstette et al. (2019),
    ``higher``.

    Args:
        ll_objective: ``state -> scalar`` lower-level loss.
        ll_model: the module whose weights the LL optimizes.
        ul_model: the module holding the UL variables (passed to objectives).
        lr: step size (> 0).
        iters: number of steps (>= 1).
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: heavy-ball momentum in [0, 1) for ``"sgd"``.
        betas: Adam's ``(beta1, beta2)``, each in [0, 1).
        eps: Adam's epsilon (> 0).
        differentiable_steps: see above.
        warn_on_growth: warn (once) when the LL loss ends above where it started.
    """

    def __init__(
        self,
        ll_objective: Objective,
        ll_model: nn.Module,
        ul_model: nn.Module,
        lr: Hyper,
        iters: int,
        optimizer: str = "sgd",
        momentum: Hyper = 0.0,
        betas: tuple[Hyper, Hyper] = (0.9, 0.999),
        eps: float = 1e-8,
        differentiable_steps: int | None = None,
        warn_on_growth: bool = True,
    ) -> None:
        if not callable(ll_objective):
            raise TypeError("ll_objective must be callable: state -> scalar tensor.")
        params = trainable_parameters(ll_model, "ll_model")
        trainable_parameters(ul_model, "ul_model")
        check_same_device_and_dtype(ll_model=ll_model, ul_model=ul_model)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be an integer >= 1, got {iters!r}.")
        if optimizer not in RULES:
            raise ValueError(f"optimizer must be one of {sorted(RULES)}, got {optimizer!r}.")
        n = len(params)
        self.ll_objective = ll_objective
        self.ll_model = ll_model
        self.ul_model = ul_model
        self.iters = iters
        self.optimizer = optimizer
        self.lr = _check_hyper(lr, "lr", iters, n, 0.0, float("inf"), closed_low=False)
        self.momentum = _check_hyper(momentum, "momentum", iters, n, 0.0, 1.0, closed_low=True)
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}.")
        self.betas = tuple(
            _check_hyper(b, f"betas[{i}]", iters, 1, 0.0, 1.0, closed_low=True)
            for i, b in enumerate(betas)
        )
        self.eps = _check_hyper(eps, "eps", iters, n, 0.0, float("inf"), closed_low=False)
        self._check_hyper_devices(params[0])
        self.differentiable_steps = differentiable_steps
        #: UL tensors whose forward-mode tangents the LL carries (set by ``Forward``)
        self.forward_variables: list[torch.Tensor] | None = None
        self._spare: nn.Module | None = None  # a patched model handed back by release()
        self.warn_on_growth = warn_on_growth

    def _check_hyper_devices(self, reference: torch.Tensor) -> None:
        for name, value in (("lr", self.lr), ("momentum", self.momentum)):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, torch.Tensor) and item.device != reference.device:
                    raise ValueError(
                        f"{name} is on {item.device} but ll_model is on {reference.device}; "
                        "keep the UL model and the LL model on one device."
                    )

    @property
    def differentiable_steps(self) -> int | None:
        """Steps at the end of the trajectory that keep a graph (``None``: all)."""
        return self._differentiable_steps

    @differentiable_steps.setter
    def differentiable_steps(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"differentiable_steps must be an int or None, got {value!r}.")
        if value is not None and value < 0:
            raise ValueError(f"differentiable_steps must be >= 0 or None, got {value}.")
        self._differentiable_steps = value

    def hyper_at(self, step: int, detach: bool, n: int) -> dict[str, list[Any]]:
        """The hyperparameters of step ``step``, one value per trainable parameter tensor."""
        idx = range(n)
        return {
            "lr": [_at(self.lr, step, i, detach) for i in idx],
            "momentum": [_at(self.momentum, step, i, detach) for i in idx],
            "betas": [tuple(_at(b, step, 0, detach) for b in self.betas) for _ in idx],
            "eps": [_at(self.eps, step, i, detach) for i in idx],
        }

    def constant_hyper(self, n: int) -> dict[bool, dict[str, list[Any]]] | None:
        """:meth:`hyper_at` for every step, keyed by ``detach``, when no hyperparameter is a
        per-step schedule (else ``None``). The tensors are the UL tensors themselves (or
        views of them), so in-place UL updates show through."""
        values = [self.lr, self.momentum, *self.betas, self.eps]
        flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
        if any(isinstance(v, torch.Tensor) and v.ndim == 1 for v in flat):
            return None
        return {detach: self.hyper_at(0, detach, n) for detach in (False, True)}

    def patched_model(self, graph_from_start: bool) -> nn.Module:
        """A ``higher``-patched copy of ``ll_model`` with fast weights at its weights.

        With ``graph_from_start`` the fast weights keep a graph to ``ll_model``'s weights (so
        that they can be UL variables, as in MAML); otherwise they are detached copies.
        Patching creates new classes and costs milliseconds, so a model handed back with
        :meth:`release` is reused.
        """
        model, self._spare = self._spare, None
        if model is None:
            # no history of earlier weights is kept (see install), so higher's own readers of
            # it (parameters(time=t), init_fast_params) refuse rather than answer wrongly
            return higher.monkeypatch(
                self.ll_model, copy_initial_weights=not graph_from_start, track_higher_grads=False
            )
        higher.patch.buffer_sync(self.ll_model, model)
        params = [
            p.clone() if graph_from_start else p.detach().clone().requires_grad_(p.requires_grad)
            for p in self.ll_model.parameters()
        ]
        install(model, params)
        return model

    def release(self, auxiliary_model: nn.Module) -> None:
        """Hand back an auxiliary model that is no longer needed.

        Its weights and graph are freed at once, and the next :meth:`optimize` reuses it
        instead of patching ``ll_model`` again. Using it afterwards raises an error.
        """
        auxiliary_model._fast_params = None  # higher's list of the fast weights of every step
        auxiliary_model.trajectory = None
        self._spare = auxiliary_model

    @property
    def rule(self) -> Rule:
        """The update rule of ``optimizer``."""
        return RULES[self.optimizer]

    def start(self, data: Any, target: Any, graph_from_start: bool = False) -> Unroll:
        """Begin an LL run on ``(data, target)``, to be stepped by hand (online methods)."""
        reference = next(p for p in self.ll_model.parameters() if p.requires_grad)
        check_data_matches(data, reference, "data")
        check_data_matches(target, reference, "target")
        return Unroll(self, data, target, graph_from_start, self.forward_variables)

    def optimize(self, data: Any, target: Any) -> nn.Module:
        """Run the LL steps on ``(data, target)`` and return the auxiliary model.

        The auxiliary model is the patched module after the last step; its
        ``trajectory`` attribute (a :class:`Trajectory`) says what was recorded.

        Raises:
            FloatingPointError: the LL loss became NaN or inf (the message names the step).
        """
        iters = self.iters
        steps = self.differentiable_steps
        tracked = iters if steps is None else min(steps, iters)
        unroll = self.start(data, target, graph_from_start=tracked == iters)
        reference = next(p for p in self.ll_model.parameters() if p.requires_grad)
        losses = reference.new_empty(iters)  # filled in place: a list of iters tensors fragments
        untracked = iters - tracked
        with self._ul_frozen(untracked > 0 and self.forward_variables is None):
            if unroll.in_place:
                unroll.run_in_place(untracked, losses[:untracked])
            recorded = [unroll.step(graph=False) for _ in range(unroll.steps, untracked)]
        recorded += [unroll.step(graph=True) for _ in range(untracked, iters)]
        if recorded:  # the steps not taken in place, all but forward mode's the graph steps
            torch.stack(recorded, out=losses[iters - len(recorded) :])
        self._check_losses(losses)
        return unroll.record(losses, tracked)

    @contextlib.contextmanager
    def _ul_frozen(self, freeze: bool) -> Iterator[None]:
        """Turn ``requires_grad`` off on the UL model's parameters while LL steps run without a
        graph, so that the LL objective records no autograd graph to them at every step; they
        are restored on exit, also on error."""
        frozen = [p for p in self.ul_model.parameters() if p.requires_grad] if freeze else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def check_used(self, grads: Sequence[torch.Tensor | None], index: Sequence[int]) -> None:
        """Raise if ``ll_objective`` gave no gradient to a trainable LL parameter.

        ``grads`` are those of the parameters at positions ``index`` of ``ll_model``.
        """
        unused = [i for i, g in zip(index, grads, strict=True) if g is None]
        if unused:
            params = list(self.ll_model.parameters())
            names = parameter_names(self.ll_model, [params[i] for i in unused])
            raise ValueError(
                f"ll_objective does not depend on ll_model parameter(s) {names}: they would "
                "never move. Use them in ll_objective or freeze them with requires_grad_(False)."
            )

    def _check_losses(self, losses: torch.Tensor) -> None:
        if not all_finite([losses]):
            bad = int(torch.nonzero(~torch.isfinite(losses))[0])
            raise FloatingPointError(
                f"The LL loss became {losses[bad].item()} at LL step {bad} of {self.iters} "
                f"(lr={self._describe(self.lr)}). Lower the LL learning rate, or check the data "
                "and the objective for NaN, log(0) or division by zero."
            )
        if not self.warn_on_growth or self.iters == 1:
            return
        first, last = losses[0].item(), losses[-1].item()
        if last > first:
            self.warn_on_growth = False  # once per optimizer, not at every UL step
            warnings.warn(
                f"The LL loss grew from {first:.4g} to {last:.4g} over {self.iters} steps: the LL "
                f"is diverging (lr={self._describe(self.lr)}). Lower the LL learning rate.",
                RuntimeWarning,
                stacklevel=3,
            )

    @staticmethod
    def _describe(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return str(value.detach().cpu().tolist())
        if isinstance(value, list):
            return "[" + ", ".join(GradientDescent._describe(v) for v in value) + "]"
        return f"{value:g}"


@contextlib.contextmanager
def evaluate_at(auxiliary_model: nn.Module, weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily give an auxiliary model other fast weights (e.g. detached copies).

    The model's own fast weights are restored on exit.
    """
    saved = list(auxiliary_model.fast_params)
    install(auxiliary_model, list(weights))
    try:
        yield
    finally:
        install(auxiliary_model, saved)

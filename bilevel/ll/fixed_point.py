"""Any fixed-point map as the lower level: ``w <- Phi(w, lambda)`` (equilibrium models)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bilevel import linalg
from bilevel.ll.gradient_descent import GradientDescent
from bilevel.ll.unroll import GradientStep
from bilevel.settings import Fixed

Tensors = list[torch.Tensor]
FixedPointMapFn = Callable[[dict[str, Any]], Tensors]


class FixedPointStep(GradientStep):
    """The step map ``w <- Phi(w, lambda)`` of a fixed-point iteration.

    Its stationarity residual is ``g = w - Phi(w, lambda)``, whose Jacobian
    ``I - dPhi/dw`` need not be symmetric. The loss it reports per step is
    ``1/2 ||Phi(w) - w||^2`` (so a diverging iteration is caught like a diverging LL loss).
    """

    symmetric = False

    def __init__(self, fixed_point_map: FixedPointMapFn) -> None:
        self.fixed_point_map = fixed_point_map

    def _image(self, weights: Tensors, state: dict) -> Tensors:
        image = self.fixed_point_map(state)
        if not isinstance(image, list | tuple) or len(image) != len(weights):
            raise TypeError(
                f"fixed_point_map must return a list of {len(weights)} tensors (one per trainable "
                f"LL parameter, in ll_model.parameters() order), got {type(image).__name__}"
                + (f" of length {len(image)}" if isinstance(image, list | tuple) else "")
                + "."
            )
        graph = False
        for i, (w, p) in enumerate(zip(weights, image, strict=True)):
            if not isinstance(p, torch.Tensor) or p.shape != w.shape or p.dtype != w.dtype:
                got = (p.shape, p.dtype) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(
                    f"fixed_point_map's output {i} must be a tensor of shape {tuple(w.shape)} and "
                    f"dtype {w.dtype} (its LL parameter's), got {got}."
                )
            graph = graph or p.requires_grad
        if not graph and torch.is_grad_enabled():
            # where the method differentiates the map: a map without a graph (computed under
            # torch.no_grad() or detached) leaves the UL variables no path through the LL
            raise ValueError(
                "fixed_point_map returned tensors with no graph (requires_grad=False) where the "
                "hypergradient differentiates it: it was computed under torch.no_grad() or "
                "from .detach()ed values, so the UL variables would have no path through the "
                "LL (and the error would surface later, blamed on the objectives). Compute "
                "the map from state['ll_model'] and state['ul_model'] with autograd on: no "
                "torch.no_grad(), .detach(), .item() or .numpy() inside it."
            )
        return list(image)

    def residual(self, weights: Tensors, state: dict) -> list[torch.Tensor | None]:
        """``w - Phi(w, lambda)``, with its graph."""
        return [w - p for w, p in zip(weights, self._image(weights, state), strict=True)]

    def __call__(
        self,
        weights: Tensors,
        opt_state: dict,
        hyper: dict[str, list[Any]],
        state: dict,
        step: int,
        create_graph: bool,
    ) -> tuple[Tensors, dict, torch.Tensor, Tensors]:
        """One iteration: ``(Phi(w), opt_state, 1/2 ||Phi(w) - w||^2, w - Phi(w))``."""
        with torch.set_grad_enabled(create_graph):
            image = self._image(weights, state)
        residual = [(w - p).detach() for w, p in zip(weights, image, strict=True)]
        loss = 0.5 * linalg.dot(residual, residual)
        return image, opt_state, loss, residual


def _check_map(value: Any, name: str) -> FixedPointMapFn:
    """A callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable: state -> list of tensors.")
    return value


class FixedPointMap(GradientDescent):
    """The lower level as ``iters`` iterations of any fixed-point map ``w <- Phi(w, lambda)``
    that is not a gradient step: equilibrium models, message passing, a solver's own update.

    ``fixed_point_map(state)`` returns the new values of the trainable LL parameters (a list,
    in ``ll_model.parameters()`` order), computed from ``state["ll_model"]`` (the patched
    model holding the current iterate) and ``state["ul_model"]``. With ``Reverse`` the
    hypergradient is back-propagated through the iterations; with ``Implicit`` it is taken at
    the fixed point from ``(I - dPhi/dw)^T q = grad_w F``, a non-symmetric system: use
    ``method="fixed_point"`` (``q <- (dPhi/dw)^T q + grad_w F``, converging when ``Phi`` is a
    contraction) or ``"normal_cg"``; ``"cg"`` and ``"minres"`` (also as solver objects) and
    ``alpha="auto"`` (power iteration bounds no step of a non-symmetric system) are refused,
    and the series' default step is 1 (the map's own iteration). The LL loss it
    reports is ``1/2 ||Phi(w) - w||^2``: an iteration that moves away from its fixed point is
    caught as a diverging LL.

    Reference: Grazzi, Franceschi, Pontil & Salzo (2020), "On the Iteration Complexity of
    Hypergradient Computation", ICML (fixed-point maps, equilibrium models); Bai, Kolter &
    Koltun (2019), "Deep Equilibrium Models", NeurIPS.

    Args:
        fixed_point_map: ``state -> list of tensors``, the map ``Phi``.
        ll_model: the module whose parameters hold the iterate (its values are the start).
        ul_model: the module holding the UL variables.
        iters: number of iterations (>= 1).
        differentiable_steps: the graph :meth:`optimize` records (``None``: all).
        on_growth: what a run whose residual ``1/2 ||Phi(w) - w||^2`` grows does:
            ``"raise"`` (:class:`~bilevel.ll.LowerLevelDivergenceError`), ``"warn"``, ``"ignore"``.
        growth_tolerance: the relative growth allowed before that.
    """

    #: the steps are the map's, not gradient steps on a loss: ``ll_objective`` is the map
    descends_objective = False

    fixed_point_map = Fixed(
        "it is also the LL optimizer's ll_objective, which BilevelProblem checked the UL "
        "method against",
        _check_map,
        cure="To change it, build the FixedPointMap, the UL method and the BilevelProblem "
        "again with the new map.",
    )
    lr = Fixed(
        "a fixed-point map takes no step size (lr is 1: a unit step on the residual "
        "w - Phi(w), which the series of Implicit read as their default step)",
        cure="To change the iteration, change the map: build the FixedPointMap, the UL method "
        "and the BilevelProblem again with it.",
    )

    def __init__(
        self,
        fixed_point_map: FixedPointMapFn,
        ll_model: nn.Module,
        ul_model: nn.Module,
        iters: int,
        differentiable_steps: int | None = None,
        on_growth: str = "raise",
        growth_tolerance: float = 1e-3,
    ) -> None:
        self.fixed_point_map = fixed_point_map
        # a step of size 1 on the residual w - Phi(w): the series' default step is then the
        # plain fixed-point iteration of the adjoint system
        # (the map stands where a gradient LL has its objective: give it to the UL method as
        # its ll_objective, so that the runner's check that both agree holds)
        super().__init__(
            fixed_point_map,
            ll_model,
            ul_model,
            1.0,
            iters,
            differentiable_steps=differentiable_steps,
            on_growth=on_growth,
            growth_tolerance=growth_tolerance,
        )

    def step_map(self, model: nn.Module, ul_batch: tuple[Any, Any] | None) -> FixedPointStep:
        """The map ``w <- Phi(w, lambda)``."""
        return FixedPointStep(self.fixed_point_map)

    def _plain_sgd(self) -> bool:
        return False

    def _run_settings(self, rule: bool) -> str:
        """A fixed-point map has no step size or update rule to quote."""
        return "fixed-point map"

    def _nonfinite_advice(self) -> str:
        """A map has no learning rate to lower."""
        return (
            "Check the fixed-point map and the data for NaN, log(0) or division by zero; a map "
            "that is not a contraction where it runs can also overflow (make it one, e.g. "
            "scale a recurrent weight below norm 1)."
        )

    def _stable_step(self, unroll: Any) -> tuple[float | None, float | None, str]:
        """Advice for a growing residual: the map is not a contraction where it runs."""
        return (
            None,
            None,
            "The fixed-point map moves its iterate away from its fixed point (it is not a "
            "contraction there): make it one (e.g. scale a recurrent weight below norm 1) or "
            "start closer to the fixed point.",
        )

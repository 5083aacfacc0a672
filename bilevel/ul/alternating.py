"""Alternating gradient steps on the LL and UL objectives (no hypergradient)."""

from __future__ import annotations

from typing import Any

from bilevel.state import parameter_names
from bilevel.ul.value_function import FirstOrderMethod, StepContext, Update


class Alternating(FirstOrderMethod):
    """Alternating optimization: ``T = ll.iters`` plain gradient steps on the LL objective,
    warm-started from the LL variables kept since the last UL step, then a UL step along the
    *partial* gradient ``grad_x F(x_k, y_{k+1})``.

    One UL step: ``y_{k+1} = y_k`` after ``T`` steps ``y <- y - alpha grad_y f(x_k, y)``
    (``alpha = ll.lr``); the UL parameters receive ``grad_x F(x_k, y_{k+1})``.

    This is the baseline that ignores how the LL solution moves with ``x``: the
    hypergradient's implicit term ``-(d grad_y f / dx)^T H^-1 grad_y F`` is dropped. It is
    exact only when ``F`` does not depend on ``y`` or ``y*`` does not depend on ``x``; in
    general it converges to a point where ``grad_x F(x, y*(x)) = 0``, which is not a
    solution of the bilevel problem (a hyperparameter that enters only the LL objective
    receives no direction at all, and is refused). With ``T = 1`` it is BOAT's ALTO; with a
    fresh LL at every step and the LL's initial weights as UL variables it would be
    first-order MAML (:class:`bilevel.ul.FirstOrder`). Cost per UL step: ``T + 1`` gradient
    evaluations; no extra memory.

    Reference: no paper of its own; it is BOAT 1.1.1's ALTO, the baseline the first-order
    methods are compared with. Dropping the implicit term is the first-order approximation of
    Finn, Abbeel & Levine (2017), "Model-Agnostic Meta-Learning", ICML.

    Args:
        ul_objective: ``state -> scalar`` UL objective ``F``.
        ul_model: module with the UL variables ``x``.
        ll_objective: ``state -> scalar`` LL objective ``f``.
        ll_model: the LL module; its trainable parameters are ``y``, updated in place.
    """

    name = "alternating"

    def settings(self) -> dict[str, Any]:
        """No hyperparameters of its own (``ll.lr`` and ``ll.iters`` are the runner's)."""
        return {}

    def _refuse_unused(self, grads: list) -> None:
        unused = [p for p, g in zip(self.ul_params, grads, strict=True) if g is None]
        if unused:
            names = parameter_names(self.ul_model, unused)
            raise ValueError(
                f"UL parameter(s) {names} get no direction from Alternating: it follows only the "
                "partial gradient grad_x F, and they do not enter the UL objective directly "
                "(hyperparameters of the LL objective, such as regularization strengths). Use "
                "a method that accounts for how y depends on them: F2SA, BOME, PBGD, MESO."
            )

    def _update(self, c: StepContext) -> Update:
        y = self.ll_descend(self.current_y(), c.iters, c.lr, c.train)
        ul_loss, _, ul_x = self.grad(self.ul_objective, "ul_objective", y, c.val, True, False)
        ll_loss = self.reported_value(self.ll_objective, "ll_objective", y, c.train)
        return Update(ul_loss=ul_loss, ll_loss=ll_loss, x_direction=ul_x, y=y)

"""Implicit gradient approximation (IGA, LwCL): the IFT with a rank-one Gauss-Newton Hessian."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from bilevel.ll import evaluate_at
from bilevel.state import Objective
from bilevel.ul.base import (
    Call,
    Grads,
    HypergradientCalculator,
    add,
    detached_weights,
    refuse_fixed_point_map,
    refuse_rule_weight_decay,
)


class IGA(HypergradientCalculator):
    """Implicit gradient approximation: the implicit hypergradient with the LL Hessian
    replaced by the outer product of the LL gradient (a rank-one Gauss-Newton model).

    At the LL iterate ``w`` (the last one), with ``f`` the LL and ``F`` the UL objective::

        dF/dlambda ~ grad_lambda F - c * grad_lambda f,
        c = <grad_w F, grad_w f> / ||grad_w f||^2        (c = 0 where grad_w f = 0)

    This is the implicit formula ``grad_lambda F - grad2_{lambda,w} f H^{-1} grad_w F`` with
    the Hessian blocks of ``f`` modelled by outer products of its gradient,
    ``H ~ grad_w f grad_w f^T`` and ``grad2_{lambda,w} f ~ grad_lambda f grad_w f^T``, and the
    pseudo-inverse of the rank-one ``H``. It costs two gradients (no Hessian-vector product,
    no LL graph), and is what the LwCL authors' code (``GN`` mode) and BOAT's ``IGA`` compute.

    It is NOT a consistent estimate of the hypergradient. As the LL converges,
    ``grad_w f -> 0`` while ``grad_lambda f`` stays finite (it tends to the gradient of the
    LL's optimal value), so ``|c|`` grows like ``1 / ||grad_w f||`` and the result turns
    towards ``+- grad_lambda f``, whatever the true hypergradient is: on ridge with per-feature
    L2 its cosine to the exact hypergradient sits at ``-+cos(grad_lambda f*, exact)`` (about
    -0.97/0.84/-0.92 on three seeds) from 10 to 1000 LL steps, while its norm grows to ``1e15``
    times the exact one once the LL gradient is round-off. A ``RuntimeWarning`` says so (once)
    when the LL gradient has fallen below ``converged_warning`` times its initial norm. The
    approximation is good when the LL is one-dimensional and its optimal value does not
    depend on ``lambda`` (``f = h(lambda) (w - a(lambda))^2 / 2``: ``c grad_lambda f ->
    -a'(lambda) grad_w F``, the exact correction). Use it with a few LL steps, as its
    authors do; for a converged LL use ``Implicit``. ``diagnostics`` holds
    ``iga_multiplier`` (``c``) and ``ll_grad_norm``.

    Reference: Liu, Gao, Liu & Fan (2024), "Learning With Constraint Learning: New
    Perspective, Solution Strategy and Various Applications", IEEE TPAMI (LwCL).

    Args:
        ul_objective: ``state -> scalar`` UL loss ``F``.
        ul_model: module with the UL variables ``lambda``.
        ll_objective: ``state -> scalar`` LL loss ``f``.
        ll_model: the LL module (weights ``w``).
        converged_warning: warn (once) when ``||grad_w f||`` at the last iterate is below this
            fraction of its norm at the first LL step (``c`` then blows up); ``None``: never.
    """

    name = "iga"
    splits_ul_batch = True  # linear in the UL objective

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
        converged_warning: float | None = 1e-3,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        number = isinstance(converged_warning, int | float) and not isinstance(
            converged_warning, bool
        )
        if converged_warning is not None:
            if not number:
                raise TypeError(
                    f"converged_warning must be a number in (0, 1) or None, got "
                    f"{converged_warning!r}."
                )
            if not 0 < converged_warning < 1:
                raise ValueError(
                    f"converged_warning must lie in (0, 1) (or be None), got {converged_warning!r}."
                )
        self.converged_warning = converged_warning
        self._warned = False

    def differentiable_steps(self, iters: int) -> int:
        """None: only gradients at the last iterate are used."""
        return 0

    def settings(self) -> dict[str, Any]:
        """None: the method has no settings."""
        return {}

    def check_against(self, ll: Any) -> None:
        """Also: the LL descends ``ll_objective`` itself, whose gradients the rank-one model
        is made of (not a fixed-point map; no ``weight_decay`` in the update rule, L2 or AdamW's
        decoupled one, which would make the LL descend another objective)."""
        refuse_fixed_point_map(ll, "IGA")
        refuse_rule_weight_decay(getattr(ll, "rule", None), "IGA")
        super().check_against(ll)

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        weights, active = detached_weights(call.trajectory)
        w = [weights[i] for i in active]
        n = len(self.ul_params)
        with evaluate_at(call.auxiliary_model, weights):
            loss = self.ul_loss(call)
            ul = torch.autograd.grad(loss, [*self.ul_params, *w], allow_unused=True)
            ll = torch.autograd.grad(self.ll_loss(call), [*self.ul_params, *w], allow_unused=True)
        pairs = [(a, b) for a, b in zip(ul[n:], ll[n:], strict=True) if b is not None]
        zero = loss.detach().new_zeros(())
        inner = sum(((a * b).sum() for a, b in pairs if a is not None), zero)
        squared = sum((b.pow(2).sum() for _, b in pairs), zero)
        tiny = torch.finfo(squared.dtype).tiny
        # the pseudo-inverse of the rank-one model: c = 0 where the LL gradient is exactly 0
        c = torch.where(squared > 0, inner / squared.clamp_min(tiny), zero)
        self.diagnostics["iga_multiplier"] = c.detach()
        self.diagnostics["ll_grad_norm"] = squared.sqrt().detach()
        self._warn_if_converged(call)
        result = [
            add(direct, None if fx is None else -c * fx)
            for direct, fx in zip(ul[:n], ll[:n], strict=True)
        ]
        return result, loss

    def _warn_if_converged(self, call: Call) -> None:
        start = call.trajectory.initial_grad_norm
        if self.converged_warning is None or start is None or self._warned:
            return
        ratio = float(self.diagnostics["ll_grad_norm"] / start.clamp_min(1e-300))
        if ratio < self.converged_warning:
            self._warned = True  # once per calculator
            warnings.warn(
                f"IGA at a converged LL: the LL gradient is {ratio:.1e} of its initial norm, and "
                "IGA's multiplier <grad_w F, grad_w f> / ||grad_w f||^2 grows like "
                f"1 / ||grad_w f|| (now {float(self.diagnostics['iga_multiplier']):.3g}): unless "
                "the LL's optimal value does not depend on lambda, the estimate points along "
                "the LL objective's lambda-gradient, not the hypergradient. Use Implicit at a "
                "converged LL, or IGA with a few LL steps (converged_warning=None: no warning).",
                RuntimeWarning,
                stacklevel=5,
            )

"""Implicit gradient approximation (IGA, LwCL): the IFT with a rank-one Gauss-Newton Hessian."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bilevel import linalg
from bilevel.ll import evaluate_at
from bilevel.roundoff import batch_terms, roundoff_floor
from bilevel.second_derivatives import once_differentiable_in
from bilevel.settings import Setting
from bilevel.state import Objective
from bilevel.ul.base import (
    Call,
    Grads,
    HypergradientCalculator,
    add,
    detached_weights,
    gradient_scale,
    refuse_fixed_point_map,
    refuse_rule_weight_decay,
)
from bilevel.user_warnings import warn_user


def _check_converged_warning(value: Any, name: str) -> float | None:
    """``None``, or a number in (0, 1)."""
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number in (0, 1) or None, got {value!r}.")
    if not 0 < value < 1:
        raise ValueError(f"{name} must lie in (0, 1) (or be None), got {value!r}.")
    return value


class IGA(HypergradientCalculator):
    """Implicit gradient approximation: the implicit hypergradient with the LL Hessian
    replaced by the outer product of the LL gradient (a rank-one Gauss-Newton model).

    At the LL iterate ``w`` (the last one), with ``f`` the LL and ``F`` the UL objective::

        dF/dlambda ~ grad_lambda F - c * grad_lambda f,
        c = <grad_w F, grad_w f> / ||grad_w f||^2        (c = 0 where grad_w f = 0)

    This is the implicit formula ``grad_lambda F - grad2_{lambda,w} f H^{-1} grad_w F`` with
    the Hessian blocks of ``f`` modelled by outer products of its gradient,
    ``H ~ grad_w f grad_w f^T`` and ``grad2_{lambda,w} f ~ grad_lambda f grad_w f^T``, and the
    pseudo-inverse of the rank-one ``H``. It costs two gradients and three Hessian-vector
    products at the last iterate (no LL graph), and is what the LwCL authors' code (``GN``
    mode) and BOAT's ``IGA`` compute (the products only set the round-off floor below).

    It is NOT a consistent estimate of the hypergradient. As the LL converges,
    ``grad_w f -> 0`` while ``grad_lambda f`` stays finite (it tends to the gradient of the
    LL's optimal value), so ``|c|`` grows like ``1 / ||grad_w f||`` and the result turns
    towards ``+- grad_lambda f``, whatever the true hypergradient is: on ridge with per-feature
    L2 its cosine to the exact hypergradient sits at ``-cos(grad_lambda f*, exact)`` (-0.97,
    -0.84, -0.92 on three seeds) from 10 to 1000 LL steps of 0.02, while its norm grows
    (with steps of 0.5 the LL gradient is at round-off by 100 steps: see below). Where the
    LL gradient is round-off (its norm at most ``ROUNDOFF * eps`` times the size of the terms
    that cancel in it, the larger of ``||H w||`` and ``||H|| ||w||`` as estimated by
    ``bilevel.ul.base.gradient_scale``, and ``sqrt(n / 100)`` times that for a gradient summed
    over ``n > 100`` examples: an LL at its solution, as one started there), ``c``
    is round-off over round-off squared (it gave ``1e15`` times the hypergradient), so it is
    taken as 0, the pseudo-inverse of a zero model: the result is ``grad_lambda F``. A
    ``RuntimeWarning`` says so (once), as it does when the LL gradient has fallen below
    ``converged_warning`` times its initial norm. The approximation is good when the LL is
    one-dimensional and its optimal value does not depend on ``lambda`` (``f = h(lambda)
    (w - a(lambda))^2 / 2``: ``c grad_lambda f -> -a'(lambda) grad_w F``, the exact
    correction). Use it with a few LL steps, as its authors do; for a converged LL use
    ``Implicit``. ``diagnostics`` holds ``iga_multiplier`` (``c``), ``ll_grad_norm`` and
    ``ll_grad_scale`` (that size; ``None`` where ``f`` has no second derivative in PyTorch:
    no floor then; the size of the other terms where some pass through a
    ``torch.autograd.Function`` marked ``once_differentiable``; a warning says either).

    Reference: Liu, Gao, Liu & Fan (2024), "Learning With Constraint Learning: New
    Perspective, Solution Strategy and Various Applications", IEEE TPAMI (LwCL).

    Args:
        ul_objective: ``state -> scalar`` UL loss ``F``.
        ul_model: module with the UL variables ``lambda``.
        ll_objective: ``state -> scalar`` LL loss ``f``.
        ll_model: the LL module (weights ``w``).
        converged_warning: warn (once) when ``||grad_w f||`` at the last iterate is below this
            fraction of its norm at the first LL step (``c`` then blows up), or at round-off
            (``c`` taken as 0); ``None``: never.
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
        self.converged_warning = converged_warning
        self._warned = False
        self._warned_scale = False

    #: may be set between UL steps, checked as at construction
    converged_warning = Setting(_check_converged_warning)

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
            ll_loss = self.ll_loss(call)
            try:
                ll = torch.autograd.grad(
                    ll_loss, [*self.ul_params, *w], create_graph=True, allow_unused=True
                )
                scale = self._gradient_scale(ll_loss, ll[n:], w)
            except RuntimeError as error:
                # torch.compile's backward compiled for first derivatives (its "donated
                # buffers", when the first backward of the objective ran without a graph)
                # refuses create_graph before it runs: the same loss's gradient, without
                if "donated buffers" not in str(error):
                    raise
                self._warn_floor(f"{error}; no floor is applied")
                ll = torch.autograd.grad(ll_loss, [*self.ul_params, *w], allow_unused=True)
                scale = None
        ll = [None if g is None else g.detach() for g in ll]
        pairs = [(a, b) for a, b in zip(ul[n:], ll[n:], strict=True) if b is not None]
        zero = loss.detach().new_zeros(())
        reached = [(a, b) for a, b in pairs if a is not None]
        inner = linalg.dot([a for a, _ in reached], [b for _, b in reached]) if reached else zero
        ll_grads = [b for _, b in pairs]
        squared = linalg.dot(ll_grads, ll_grads) if pairs else zero
        tiny = torch.finfo(squared.dtype).tiny
        # the pseudo-inverse of the rank-one model: c = 0 where the LL gradient is 0, to
        # round-off (there c would be round-off / round-off^2: 1e15 times the hypergradient;
        # without second derivatives of f, no floor can be taken: exactly 0)
        floor = zero if scale is None else roundoff_floor(scale, batch_terms(call.train_data))
        nonzero = squared.sqrt() > floor
        c = torch.where(nonzero, inner / squared.clamp_min(tiny), zero)
        self.diagnostics["iga_multiplier"] = c.detach()
        self.diagnostics["ll_grad_norm"] = squared.sqrt().detach()
        self.diagnostics["ll_grad_scale"] = scale
        self._warn_if_converged(call, nonzero, [a for a, _ in pairs if a is not None])
        result = [
            add(direct, None if fx is None else -c * fx)
            for direct, fx in zip(ul[:n], ll[:n], strict=True)
        ]
        return result, loss

    def _gradient_scale(
        self, loss: torch.Tensor, grads: Sequence[torch.Tensor | None], w: list[torch.Tensor]
    ) -> torch.Tensor | None:
        """The size of the terms that cancel in the LL gradient ``grads`` (with its graph) at
        ``w``, which sets its round-off (a detached 0-d tensor; three Hessian-vector products,
        ``bilevel.ul.base.gradient_scale``, as :class:`~bilevel.ul.Implicit` takes it).
        ``None`` where ``ll_objective`` has no second derivative in PyTorch (``torch.cdist``
        on a few rows, ``pdist``, ``embedding_bag``: ``NotImplementedError``; a
        ``torch.compile``'d model: ``RuntimeError``), which IGA's formula does not need: said
        once, and no floor is applied. Where the LL ``loss`` passes through a
        ``torch.autograd.Function`` marked ``once_differentiable`` (or a compiled loss), the
        products leave its terms out without an error: the size of the other terms (a lower
        bound) is taken, and that is said once too."""
        if self._converged_warning is not None and not self._warned_scale:  # (only said)
            once = once_differentiable_in(loss, w)
            if once is not None:
                self._warn_floor(
                    f"the torch.autograd.Function {once} is marked once_differentiable (or is "
                    "torch.compile's, which has no double backward): the floor counts only the "
                    "terms of ll_objective outside it"
                )
        linked = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not linked:  # the LL gradient does not depend on w: H = 0
            return w[0].detach().new_zeros(())

        def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
            products = torch.autograd.grad(
                [g for g, _ in linked],
                w,
                grad_outputs=[v[i] for _, i in linked],
                retain_graph=True,
                allow_unused=True,
            )
            return [
                torch.zeros_like(x) if h is None else h for x, h in zip(w, products, strict=True)
            ]

        g = [torch.zeros_like(x) if gi is None else gi for x, gi in zip(w, grads, strict=True)]
        try:
            return gradient_scale(hvp, w, g)
        except NotImplementedError as error:  # a first-order-only op in ll_objective
            self._warn_floor(f"{error}; no floor is applied")
            return None
        except RuntimeError as error:  # torch.compile's: "does not ... support double backward"
            if "double backward" not in str(error):
                raise
            self._warn_floor(f"{error}; no floor is applied")
            return None

    def _warn_floor(self, reason: str) -> None:
        """Say (once) that the round-off floor of the multiplier is missing or partial."""
        if self._converged_warning is not None and not self._warned_scale:
            self._warned_scale = True  # once per calculator
            warn_user(
                "IGA could not take the Hessian-vector products that set the round-off floor "
                f"of its multiplier ({reason}): at an LL whose gradient is round-off (an LL at "
                "its solution) the multiplier is round-off over round-off squared and the "
                "result can be huge. IGA's formula itself needs first derivatives only and is "
                "computed as usual. Write ll_objective with operations that have second "
                "derivatives (for torch.cdist, the squared differences summed; for a "
                "torch.autograd.Function, a backward made of differentiable operations, not "
                "marked once_differentiable), or start the LL away from its solution "
                "(converged_warning=None: no warning).",
                RuntimeWarning,
            )

    def _warn_if_converged(
        self, call: Call, nonzero: torch.Tensor, ul_grad_w: list[torch.Tensor]
    ) -> None:
        """Warn (once) at a converged LL: its gradient at round-off, where ``c`` was taken as
        0 (unless ``grad_w F``, ``ul_grad_w``, is 0, which makes that exact), or below
        ``converged_warning`` of its first norm."""
        if self._converged_warning is None or self._warned:
            return
        start = call.trajectory.initial_grad_norm
        if not bool(nonzero):  # one host sync
            if any(bool(v.any()) for v in ul_grad_w):  # on this path only
                self._warned = True  # once per calculator
                scale = self.diagnostics["ll_grad_scale"]
                against = "" if scale is None else f", against {float(scale):.1e}"
                warn_user(
                    "IGA at the LL's solution: the LL gradient is at round-off (norm "
                    f"{float(self.diagnostics['ll_grad_norm']):.1e}{against} for the terms that "
                    "cancel in it), where IGA's multiplier <grad_w F, grad_w f> / "
                    "||grad_w f||^2 is 0 / 0: it is taken as 0 (the pseudo-inverse of the "
                    "rank-one Hessian model), so the result is grad_lambda F alone: the term "
                    "of the LL's response to lambda, which the hypergradient adds to it, is "
                    "left out. Use Implicit at a converged LL, or IGA with a few LL steps from "
                    "a point away from the LL's solution (converged_warning=None: no warning).",
                    RuntimeWarning,
                )
            return
        if start is None:
            return
        ratio = float(
            self.diagnostics["ll_grad_norm"] / start.clamp_min(torch.finfo(start.dtype).tiny)
        )
        if ratio < self._converged_warning:
            self._warned = True  # once per calculator
            warn_user(
                f"IGA at a converged LL: the LL gradient is {ratio:.1e} of its initial norm, and "
                "IGA's multiplier <grad_w F, grad_w f> / ||grad_w f||^2 grows like "
                f"1 / ||grad_w f|| (now {float(self.diagnostics['iga_multiplier']):.3g}): unless "
                "the LL's optimal value does not depend on lambda, the estimate points along "
                "the LL objective's lambda-gradient, not the hypergradient. Use Implicit at a "
                "converged LL, or IGA with a few LL steps (converged_warning=None: no warning).",
                RuntimeWarning,
            )

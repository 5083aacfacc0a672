"""Differentiable update rules of the lower-level optimizer, built from small pieces.

An :class:`UpdateRule` pairs a pure update function with the hyperparameters the user gave
and their valid intervals. The update function
``update(params, grads, state, hyper, step) -> (new_params, new_state)`` works on lists of
tensors with out-of-place ops only, so that autograd differentiates it with respect to the
parameters and to the hyperparameters (0-d tensors, possibly UL variables):

- ``hyper`` maps every hyperparameter name, ``"lr"`` included, to a list with one value per
  parameter tensor (a Python float or a 0-d tensor): the values of this step;
- ``state`` maps a name to a list with one tensor per parameter tensor (``{}`` at first);
  the input is never modified;
- ``step`` is the 0-based index of the step.

Each rule computes what the default single-tensor implementation of its ``torch.optim``
counterpart computes (``maximize=False``). A term whose coefficient is a Python number equal
to zero is skipped, as ``torch.optim`` skips it, so that plain SGD costs nothing extra and
rounds exactly as ``p - lr * g``; a tensor coefficient is always applied, whatever its value.
Square roots are taken of ``max(x, tiny)``, so that their derivative stays finite where a
gradient is exactly zero (``eps`` is added after the root, as in ``torch.optim``).

Reference for the composable design: Babuschkin et al. (2020), "The DeepMind JAX Ecosystem"
(optax).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Tensors = list[torch.Tensor]
Update = Callable[[Tensors, Tensors, dict, dict[str, list[Any]], int], tuple[Tensors, dict]]
Rule = Update  # the name the LL optimizer imported before the factories existed
HyperValue = Any  # a float, a tensor, a callable ``ul_model -> tensor``, a schedule or a list

__all__ = [
    "LR_BOUND",
    "RULES",
    "Bound",
    "UpdateRule",
    "adagrad",
    "adam",
    "adamw",
    "make_rule",
    "nesterov",
    "rmsprop",
    "sgd",
]


@dataclass(frozen=True)
class Bound:
    """The valid interval of one hyperparameter: ``[low, high)`` or ``(low, high)``.

    ``high`` itself is never allowed (``math.inf`` for no upper limit), nor is NaN.
    """

    low: float
    high: float
    closed_low: bool  # whether low itself is allowed

    def contains(self, value: float) -> bool:
        """Whether the number ``value`` lies in the interval."""
        above = value >= self.low if self.closed_low else value > self.low
        return bool(above and value < self.high)

    def __str__(self) -> str:
        return f"{'[' if self.closed_low else '('}{self.low}, {self.high})"


_UNIT = Bound(0.0, 1.0, closed_low=True)  # [0, 1): moment decays, momentum, dampening
_NON_NEGATIVE = Bound(0.0, math.inf, closed_low=True)  # [0, inf): weight decay, lr decay
_POSITIVE = Bound(0.0, math.inf, closed_low=False)  # (0, inf): eps
LR_BOUND = Bound(0.0, math.inf, closed_low=False)
"""The valid interval of the learning rate, which the LL optimizer takes itself."""


@dataclass(frozen=True)
class UpdateRule:
    """An update function with the hyperparameters the user gave (``lr`` excluded) and the
    valid interval of each.

    ``hyper`` values are stored as given (a plain number as a float): a float, a tensor, a
    callable ``ul_model -> tensor``, a per-step schedule or a per-parameter list. The LL
    optimizer validates them against ``bounds`` and hands ``update`` per-parameter lists.
    Reference: Babuschkin et al. (2020), "The DeepMind JAX Ecosystem" (optax's
    ``GradientTransformation``).
    """

    name: str
    update: Update
    hyper: dict[str, Any]
    bounds: dict[str, Bound]

    def __post_init__(self) -> None:
        if set(self.hyper) != set(self.bounds):
            raise ValueError(
                f"{self.name}: hyper keys {sorted(self.hyper)} and bounds keys "
                f"{sorted(self.bounds)} differ."
            )


# ---------------------------------------------------------------------------------------------
# Pieces, on one parameter tensor.


def _is_zero(value: Any) -> bool:
    """Whether ``value`` is a Python number equal to zero (its term is then skipped)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _root(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, tiny))``: the derivative stays finite (zero) where ``x`` is zero."""
    return x.clamp_min(torch.finfo(x.dtype).tiny).sqrt()


def _l2(grad: torch.Tensor, param: torch.Tensor, weight_decay: Any) -> torch.Tensor:
    """``g + wd * p``: weight decay as an L2 penalty added to the gradient."""
    return grad if _is_zero(weight_decay) else grad + weight_decay * param


def _decoupled_decay(param: torch.Tensor, lr: Any, weight_decay: Any) -> torch.Tensor:
    """``p * (1 - lr * wd)``: weight decay decoupled from the gradient (AdamW)."""
    return param if _is_zero(weight_decay) else param * (1 - lr * weight_decay)


def _ema(average: torch.Tensor, value: torch.Tensor, decay: Any) -> torch.Tensor:
    """``decay * average + (1 - decay) * value``: an exponential moving average."""
    return decay * average + (1 - decay) * value


def _heavy_ball(
    buffer: torch.Tensor | None, grad: torch.Tensor, momentum: Any, dampening: Any
) -> torch.Tensor:
    """``b <- mu b + (1 - dampening) g``, and ``b = g`` where there is no buffer yet."""
    if buffer is None or buffer.shape != grad.shape:
        return grad
    if _is_zero(dampening):
        return momentum * buffer + grad
    return momentum * buffer + (1 - dampening) * grad


def _previous(state: dict, key: str, n: int) -> list[torch.Tensor | None]:
    """The state tensors under ``key``, or ``None`` for each of the ``n`` parameters."""
    old = state.get(key)
    return [None] * n if old is None else list(old)


def _no_buffer(param: torch.Tensor) -> torch.Tensor:
    """The placeholder of a buffer that does not exist yet (a tensor, so that the state stays
    a dict of lists of tensors; its shape differs from the parameter's)."""
    return param.new_zeros(0)


def _on_parts(update: Update) -> Update:
    """``update`` with complex parameters (and their gradients, state and per-element
    hyperparameters) taken as real tensors of their parts, ``torch.view_as_real`` (a last
    dimension of 2), as ``torch.optim``'s Adam, AdamW, RMSprop and Adagrad take them: their
    squares and roots act on each part (``g * g`` of a complex ``g`` is no square, and the
    root of a complex number is no scale). The state keeps the parameters' dtype."""

    @functools.wraps(update)
    def on_parts(
        params: Tensors, grads: Tensors, state: dict, hyper: dict[str, list[Any]], step: int
    ) -> tuple[Tensors, dict]:
        parts = [p.is_complex() for p in params]
        if not any(parts):  # the usual case
            return update(params, grads, state, hyper, step)

        def real(tensors: list) -> list:
            return [
                torch.view_as_real(t) if c and t is not None else t
                for t, c in zip(tensors, parts, strict=True)
            ]

        def joined(tensors: Tensors) -> Tensors:
            return [
                torch.view_as_complex(t) if c else t for t, c in zip(tensors, parts, strict=True)
            ]

        both = {  # a per-element value (its parameter's shape) applies to both parts
            name: [
                v.unsqueeze(-1) if c and isinstance(v, torch.Tensor) and v.ndim else v
                for v, c in zip(values, parts, strict=True)
            ]
            for name, values in hyper.items()
        }
        viewed = {name: real(list(values)) for name, values in state.items()}
        new, new_state = update(real(params), real(grads), viewed, both, step)
        return joined(new), {name: joined(values) for name, values in new_state.items()}

    return on_parts


def _momentum_sgd(
    params: Tensors, grads: Tensors, state: dict, hyper: dict[str, list[Any]], nesterov: bool
) -> tuple[Tensors, dict]:
    """SGD with optional heavy-ball or Nesterov momentum, as ``torch.optim.SGD``."""
    n = len(params)
    dampenings = [0.0] * n if nesterov else hyper["dampening"]
    columns = (params, grads, hyper["lr"], hyper["momentum"], hyper["weight_decay"], dampenings)
    old = _previous(state, "momentum_buffer", n)
    new, buffers = [], []
    for (p, g, lr, mu, wd, damp), buffer in zip(zip(*columns, strict=True), old, strict=True):
        g = _l2(g, p, wd)
        if not _is_zero(mu):
            buffer = _heavy_ball(buffer, g, mu, damp)
            g = g + mu * buffer if nesterov else buffer
        new.append(p - lr * g)
        buffers.append(buffer)
    if all(b is None for b in buffers):
        return new, state
    buffers = [_no_buffer(p) if b is None else b for p, b in zip(params, buffers, strict=True)]
    return new, {**state, "momentum_buffer": buffers}


def _sgd_update(
    params: Tensors, grads: Tensors, state: dict, hyper: dict[str, list[Any]], step: int
) -> tuple[Tensors, dict]:
    """The update of :func:`sgd`. Reference: Polyak (1964), heavy-ball momentum."""
    return _momentum_sgd(params, grads, state, hyper, nesterov=False)


def _nesterov_update(
    params: Tensors, grads: Tensors, state: dict, hyper: dict[str, list[Any]], step: int
) -> tuple[Tensors, dict]:
    """The update of :func:`nesterov`. Reference: Sutskever et al. (2013), ICML."""
    return _momentum_sgd(params, grads, state, hyper, nesterov=True)


def _adam_step(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr: Any,
    beta1: Any,
    beta2: Any,
    eps: Any,
    t: int,
) -> torch.Tensor:
    """``p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``, as ``torch.optim``."""
    step_size = lr / (1 - beta1**t)
    denom = _root(exp_avg_sq) / (1 - beta2**t) ** 0.5 + eps
    return param - step_size * (exp_avg / denom)


def _adam_like(
    params: Tensors,
    grads: Tensors,
    state: dict,
    hyper: dict[str, list[Any]],
    step: int,
    decoupled: bool,
) -> tuple[Tensors, dict]:
    """Adam (L2 decay added to the gradient) or AdamW (decoupled decay)."""
    n = len(params)
    columns = (
        params,
        grads,
        _previous(state, "exp_avg", n),
        _previous(state, "exp_avg_sq", n),
        hyper["lr"],
        hyper["beta1"],
        hyper["beta2"],
        hyper["eps"],
        hyper["weight_decay"],
    )
    new, ms, vs = [], [], []
    for p, g, m, v, lr, b1, b2, eps, wd in zip(*columns, strict=True):
        if decoupled:
            p = _decoupled_decay(p, lr, wd)
        else:
            g = _l2(g, p, wd)
        m = _ema(torch.zeros_like(p) if m is None else m, g, b1)
        v = _ema(torch.zeros_like(p) if v is None else v, g * g, b2)
        new.append(_adam_step(p, m, v, lr, b1, b2, eps, step + 1))
        ms.append(m)
        vs.append(v)
    return new, {**state, "exp_avg": ms, "exp_avg_sq": vs}


@_on_parts
def _adam_update(
    params: Tensors, grads: Tensors, state: dict, hyper: dict[str, list[Any]], step: int
) -> tuple[Tensors, dict]:
    """The update of :func:`adam`. Reference: Kingma & Ba (2015), ICLR."""
    return _adam_like(params, grads, state, hyper, step, decoupled=False)


@_on_parts
def _adamw_update(
    params: Tensors, grads: Tensors, state: dict, hyper: dict[str, list[Any]], step: int
) -> tuple[Tensors, dict]:
    """The update of :func:`adamw`. Reference: Loshchilov & Hutter (2019), ICLR."""
    return _adam_like(params, grads, state, hyper, step, decoupled=True)


@_on_parts
def _rmsprop_update(
    params: Tensors, grads: Tensors, state: dict, hyper: dict[str, list[Any]], step: int
) -> tuple[Tensors, dict]:
    """The update of :func:`rmsprop`. Reference: Tieleman & Hinton (2012), lecture 6.5."""
    n = len(params)
    columns = (
        params,
        grads,
        _previous(state, "square_avg", n),
        _previous(state, "momentum_buffer", n),
        hyper["lr"],
        hyper["alpha"],
        hyper["eps"],
        hyper["momentum"],
        hyper["weight_decay"],
    )
    new, squares, buffers = [], [], []
    for p, g, sq, buffer, lr, alpha, eps, mu, wd in zip(*columns, strict=True):
        g = _l2(g, p, wd)
        sq = _ema(torch.zeros_like(p) if sq is None else sq, g * g, alpha)
        scaled = g / (_root(sq) + eps)
        if _is_zero(mu):
            new.append(p - lr * scaled)
        else:  # torch.optim starts the buffer at zero
            buffer = mu * (torch.zeros_like(p) if buffer is None else buffer) + scaled
            new.append(p - lr * buffer)
        squares.append(sq)
        buffers.append(buffer)
    out = {**state, "square_avg": squares}
    if any(b is not None for b in buffers):
        out["momentum_buffer"] = [
            torch.zeros_like(p) if b is None else b for p, b in zip(params, buffers, strict=True)
        ]
    return new, out


@_on_parts
def _adagrad_update(
    params: Tensors, grads: Tensors, state: dict, hyper: dict[str, list[Any]], step: int
) -> tuple[Tensors, dict]:
    """The update of :func:`adagrad`. Reference: Duchi, Hazan & Singer (2011), JMLR."""
    n = len(params)
    columns = (
        params,
        grads,
        _previous(state, "sum", n),
        hyper["lr"],
        hyper["lr_decay"],
        hyper["eps"],
        hyper["weight_decay"],
        hyper["initial_accumulator_value"],
    )
    new, sums = [], []
    for p, g, total, lr, lr_decay, eps, wd, initial in zip(*columns, strict=True):
        g = _l2(g, p, wd)
        if total is None:
            if isinstance(initial, torch.Tensor):
                total = torch.zeros_like(p) + initial
            else:
                total = torch.full_like(p, initial)
        clr = lr if _is_zero(lr_decay) else lr / (1 + step * lr_decay)
        total = total + g * g
        new.append(p - clr * (g / (_root(total) + eps)))
        sums.append(total)
    return new, {**state, "sum": sums}


# ---------------------------------------------------------------------------------------------
# Factories.


def _checked(name: str, value: Any, bound: Bound) -> Any:
    """``value`` with a plain number as a float; refuse booleans, non-numbers and numbers
    outside ``bound``. Tensors and callables are left to the LL optimizer."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, not a bool (got {value!r}).")
    if isinstance(value, numbers.Real):
        number = float(value)
        if not bound.contains(number):
            raise ValueError(f"{name} must lie in {bound}, got {value!r}.")
        return number
    if isinstance(value, list | tuple):
        items = [_checked(f"{name}[{i}]", v, bound) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, torch.Tensor) or callable(value):
        return value
    from bilevel.ll.hyper import _Marked  # (hyper imports this module)

    if isinstance(value, _Marked):  # PerElement / PerStep: checked with the LL optimizer
        return value
    raise TypeError(
        f"{name} must be a number, a tensor, a callable ul_model -> tensor, a list of them, "
        f"or one marked bilevel.ll.PerElement or PerStep, got {type(value).__name__}."
    )


def _rule(
    name: str,
    update: Update,
    values: dict[str, tuple[Any, Bound]],
    shown: dict[str, str] | None = None,
) -> UpdateRule:
    """An :class:`UpdateRule` whose plain numbers were checked against their bounds
    (``shown`` names a key as the user wrote it, e.g. ``betas[0]`` for ``beta1``)."""
    shown = shown or {}
    hyper = {k: _checked(shown.get(k, k), v, b) for k, (v, b) in values.items()}
    return UpdateRule(name, update, hyper, {k: b for k, (_, b) in values.items()})


def _split_betas(betas: Any) -> tuple[Any, Any]:
    """``(beta1, beta2)`` from Adam's ``betas`` pair."""
    if not isinstance(betas, tuple | list):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {type(betas).__name__}.")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {len(betas)} values.")
    return betas[0], betas[1]


def sgd(
    momentum: HyperValue = 0.0, weight_decay: HyperValue = 0.0, dampening: HyperValue = 0.0
) -> UpdateRule:
    """``torch.optim.SGD``: ``g += wd p``; ``b <- mu b + (1 - dampening) g`` (``b = g`` at the
    first step); ``p <- p - lr b`` (``p - lr g`` without momentum).

    momentum, dampening in [0, 1); weight_decay in [0, inf).
    Reference: Robbins & Monro (1951), "A Stochastic Approximation Method"; Polyak (1964),
    "Some methods of speeding up the convergence of iteration methods" (heavy ball).
    """
    return _rule(
        "sgd",
        _sgd_update,
        {
            "momentum": (momentum, _UNIT),
            "weight_decay": (weight_decay, _NON_NEGATIVE),
            "dampening": (dampening, _UNIT),
        },
    )


def nesterov(momentum: HyperValue = 0.9, weight_decay: HyperValue = 0.0) -> UpdateRule:
    """``torch.optim.SGD(nesterov=True)``: ``g += wd p``; ``b <- mu b + g`` (``b = g`` at the
    first step); ``p <- p - lr (g + mu b)``.

    momentum in (0, 1); weight_decay in [0, inf).
    Reference: Nesterov (1983); Sutskever, Martens, Dahl & Hinton (2013), "On the importance
    of initialization and momentum in deep learning", ICML.
    """
    return _rule(
        "nesterov",
        _nesterov_update,
        {
            "momentum": (momentum, Bound(0.0, 1.0, closed_low=False)),
            "weight_decay": (weight_decay, _NON_NEGATIVE),
        },
    )


def adam(
    betas: tuple[HyperValue, HyperValue] = (0.9, 0.999),
    eps: HyperValue = 1e-8,
    weight_decay: HyperValue = 0.0,
) -> UpdateRule:
    """``torch.optim.Adam``: bias-corrected moments, ``eps`` added after the root, weight
    decay added to the gradient. Hyperparameter keys ``beta1``, ``beta2``, ``eps``,
    ``weight_decay``.

    betas in [0, 1); eps in (0, inf); weight_decay in [0, inf).
    Reference: Kingma & Ba (2015), "Adam: A Method for Stochastic Optimization", ICLR.
    """
    return _adam_family("adam", _adam_update, betas, eps, weight_decay)


def adamw(
    betas: tuple[HyperValue, HyperValue] = (0.9, 0.999),
    eps: HyperValue = 1e-8,
    weight_decay: HyperValue = 1e-2,
) -> UpdateRule:
    """``torch.optim.AdamW``: Adam with decoupled weight decay ``p <- p (1 - lr wd)`` before
    the Adam step. Hyperparameter keys ``beta1``, ``beta2``, ``eps``, ``weight_decay``.

    betas in [0, 1); eps in (0, inf); weight_decay in [0, inf).
    Reference: Loshchilov & Hutter (2019), "Decoupled Weight Decay Regularization", ICLR.
    """
    return _adam_family("adamw", _adamw_update, betas, eps, weight_decay)


def _adam_family(
    name: str,
    update: Update,
    betas: tuple[HyperValue, HyperValue],
    eps: HyperValue,
    weight_decay: HyperValue,
) -> UpdateRule:
    """The rule of an Adam-like update with the bounds its four hyperparameters share."""
    beta1, beta2 = _split_betas(betas)
    return _rule(
        name,
        update,
        {
            "beta1": (beta1, _UNIT),
            "beta2": (beta2, _UNIT),
            "eps": (eps, _POSITIVE),
            "weight_decay": (weight_decay, _NON_NEGATIVE),
        },
        {"beta1": "betas[0]", "beta2": "betas[1]"},
    )


def rmsprop(
    alpha: HyperValue = 0.99,
    eps: HyperValue = 1e-8,
    momentum: HyperValue = 0.0,
    weight_decay: HyperValue = 0.0,
) -> UpdateRule:
    """``torch.optim.RMSprop`` (not centered): ``g += wd p``; ``v <- alpha v + (1 - alpha)
    g^2``; ``u = g / (sqrt(v) + eps)``; ``p <- p - lr u``, or with momentum ``b <- mu b + u``
    (``b`` starts at zero), ``p <- p - lr b``.

    alpha, momentum in [0, 1); eps in (0, inf); weight_decay in [0, inf).
    Reference: Tieleman & Hinton (2012), "Lecture 6.5 - rmsprop", COURSERA: Neural Networks
    for Machine Learning.
    """
    return _rule(
        "rmsprop",
        _rmsprop_update,
        {
            "alpha": (alpha, _UNIT),
            "eps": (eps, _POSITIVE),
            "momentum": (momentum, _UNIT),
            "weight_decay": (weight_decay, _NON_NEGATIVE),
        },
    )


def adagrad(
    lr_decay: HyperValue = 0.0,
    eps: HyperValue = 1e-10,
    weight_decay: HyperValue = 0.0,
    initial_accumulator_value: HyperValue = 0.0,
) -> UpdateRule:
    """``torch.optim.Adagrad``: ``g += wd p``; ``s <- s + g^2`` (``s`` starts at
    ``initial_accumulator_value``); ``p <- p - lr / (1 + t lr_decay) g / (sqrt(s) + eps)``
    at the 0-based step ``t``.

    lr_decay, weight_decay, initial_accumulator_value in [0, inf); eps in (0, inf).
    Reference: Duchi, Hazan & Singer (2011), "Adaptive Subgradient Methods for Online
    Learning and Stochastic Optimization", JMLR.
    """
    return _rule(
        "adagrad",
        _adagrad_update,
        {
            "lr_decay": (lr_decay, _NON_NEGATIVE),
            "eps": (eps, _POSITIVE),
            "weight_decay": (weight_decay, _NON_NEGATIVE),
            "initial_accumulator_value": (initial_accumulator_value, _NON_NEGATIVE),
        },
    )


RULES: dict[str, Callable[..., UpdateRule]] = {
    "sgd": sgd,
    "nesterov": nesterov,
    "adam": adam,
    "adamw": adamw,
    "rmsprop": rmsprop,
    "adagrad": adagrad,
}


def make_rule(name: str, **kwargs: Any) -> UpdateRule:
    """The rule ``name`` of :data:`RULES` with the hyperparameters ``kwargs`` (``lr`` is the
    LL optimizer's). Raises ValueError for an unknown name, TypeError for an argument the
    rule does not take. Reference: Babuschkin et al. (2020), "The DeepMind JAX Ecosystem".
    """
    if not isinstance(name, str):
        raise TypeError(f"the rule name must be a string, got {type(name).__name__}.")
    factory = RULES.get(name)
    if factory is None:
        raise ValueError(f"unknown update rule {name!r}; valid names: {', '.join(sorted(RULES))}.")
    accepted = list(inspect.signature(factory).parameters)
    for key in kwargs:
        if key not in accepted:
            hint = " (the learning rate goes to the LL optimizer)" if key == "lr" else ""
            raise TypeError(
                f"{name} takes no argument {key!r}; it takes {', '.join(accepted)}{hint}."
            )
    return factory(**kwargs)

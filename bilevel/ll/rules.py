"""Differentiable update rules: plain SGD, heavy-ball momentum and Adam.

Each rule is a pure function ``rule(params, grads, state, hyper, step) -> (params, state)`` on
lists of tensors, written with out-of-place ops so that autograd can differentiate through it
with respect to the parameters and to the hyperparameters (which may be UL tensors).
``hyper`` holds, per parameter tensor, the value of each hyperparameter at this step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Tensors = list[torch.Tensor]
Rule = Callable[[Tensors, Tensors, dict[str, Any], dict[str, list[Any]], int], tuple[Tensors, dict]]


def sgd(
    params: Tensors, grads: Tensors, state: dict, hyper: dict, step: int
) -> tuple[Tensors, dict]:
    """``w <- w - lr * g``; with ``momentum`` ``mu``: ``b <- mu b + g``, ``w <- w - lr * b``.

    Same conventions as ``torch.optim.SGD`` (no dampening; the first buffer is ``g``).
    Reference: Polyak (1964) for the heavy-ball momentum.
    """
    lrs, mus = hyper["lr"], hyper["momentum"]
    if all(isinstance(mu, float) and mu == 0.0 for mu in mus):
        return [p - lr * g for p, g, lr in zip(params, grads, lrs, strict=True)], state
    buffers = state.get("momentum_buffer")
    if buffers is None:
        buffers = list(grads)
    else:
        buffers = [mu * b + g for b, g, mu in zip(buffers, grads, mus, strict=True)]
    new = [p - lr * b for p, b, lr in zip(params, buffers, lrs, strict=True)]
    return new, {"momentum_buffer": buffers}


def adam(
    params: Tensors, grads: Tensors, state: dict, hyper: dict, step: int
) -> tuple[Tensors, dict]:
    """Adam, as ``torch.optim.Adam`` (bias-corrected moments, ``eps`` added after the root).

    The root is taken of ``max(v, tiny)`` so that its derivative stays finite where a
    gradient is exactly zero. Reference: Kingma & Ba (2015), "Adam", ICLR.
    """
    t = step + 1
    m_old = state.get("exp_avg", [torch.zeros_like(p) for p in params])
    v_old = state.get("exp_avg_sq", [torch.zeros_like(p) for p in params])
    new, m_new, v_new = [], [], []
    for p, g, m, v, lr, (b1, b2), eps in zip(
        params, grads, m_old, v_old, hyper["lr"], hyper["betas"], hyper["eps"], strict=True
    ):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        root = v_hat.clamp_min(torch.finfo(v_hat.dtype).tiny).sqrt()
        new.append(p - lr * m_hat / (root + eps))
        m_new.append(m)
        v_new.append(v)
    return new, {"exp_avg": m_new, "exp_avg_sq": v_new}


RULES: dict[str, Rule] = {"sgd": sgd, "adam": adam}

"""Forward-mode hypergradient: tangents carried through the LL steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bilevel.ll import evaluate_at
from bilevel.second_derivatives import FIRST_ORDER_METHODS, refuse_once_differentiable
from bilevel.state import Objective
from bilevel.ul.base import Call, Grads, HypergradientCalculator, detached_weights
from bilevel.user_warnings import warn_user

Tensors = list[torch.Tensor]

MANY = 1000  # scalar hyperparameters above which Forward warns about its cost


def directions(variable: torch.Tensor) -> torch.Tensor:
    """The unit directions that forward mode carries a tangent along, one row per real
    coordinate of ``variable`` (flattened): the identity, and for a complex variable the
    identity then ``1j`` times it. A complex function of a complex variable is not
    holomorphic in general (``|w|^2``, ``w.real``), so the derivatives along the real and the
    imaginary part are two tangents: one complex tangent per entry gave the derivative along
    the real parts alone (33% off on a complex ridge problem)."""
    eye = torch.eye(variable.numel(), dtype=variable.dtype, device=variable.device)
    return torch.cat([eye, 1j * eye]) if variable.is_complex() else eye


def tangent_count(variables: Tensors) -> int:
    """How many tangents forward mode carries for ``variables``: their real coordinates (a
    complex entry has two)."""
    return sum(v.numel() * (2 if v.is_complex() else 1) for v in variables)


#: who differentiates the step map's vector-Jacobian products (refused Functions' message)
FORWARD_MODE = (
    "Forward mode (Forward; online RTHO), which takes its Jacobian-vector products as "
    "derivatives of vector-Jacobian products,"
)
#: the methods that run a Function's backward once where forward mode would differentiate it
RUN_ONCE = (
    "Reverse, Truncated or MemorySavingReverse (back-propagation runs that backward once), or "
    f"a method that needs first derivatives only: {FIRST_ORDER_METHODS}"
)


class Forward(HypergradientCalculator):
    """Forward-mode hypergradient (FMD): carry ``Z_t = dw_t/dlambda`` through the LL steps.

    The LL propagates ``Z_{t+1} = A_t Z_t + B_t`` (the optimizer state's tangents included:
    momentum buffers, Adam moments) with Jacobian-vector products, one per real scalar of the UL
    variables (two per complex entry), and keeps no graph across steps: memory is independent
    of the number of LL steps, and cost grows with the number of scalar hyperparameters. Then
    ``dF/dlambda = grad_lambda L_ul + Z_T^T grad_w L_ul``: the same number as ``Reverse``.
    Use it for a few hyperparameters (an L2 coefficient, the LL step size, the momentum) and
    long LL runs; it is the basis of online RTHO (:class:`bilevel.online.OnlineHypergradient`).

    Reference: Franceschi, Donini, Frasconi & Pontil (2017), "Forward and Reverse
    Gradient-Based Hyperparameter Optimization", ICML; Williams & Zipser (1989) (RTRL).

    Args:
        ul_objective: ``state -> scalar`` UL loss.
        ul_model: module with the UL variables.
        ll_objective: ``state -> scalar`` LL loss.
        ll_model: the LL module.
    """

    name = "forward"
    splits_ul_batch = True  # linear in the UL objective

    def differentiable_steps(self, iters: int) -> int:
        """None: the tangents replace the graph."""
        return 0

    def __init__(
        self,
        ul_objective: Objective,
        ul_model: nn.Module,
        ll_objective: Objective,
        ll_model: nn.Module,
    ) -> None:
        super().__init__(ul_objective, ul_model, ll_objective, ll_model)
        n = tangent_count(self.ul_params)
        if n > MANY:
            warn_user(
                "Forward carries one tangent per real coordinate of the hyperparameters (two "
                f"per complex entry): {n} Jacobian-vector products per LL step, and tangents of "
                f"{n} times the LL's size in memory. "
                "For this many hyperparameters use Reverse, Truncated or Implicit.",
                RuntimeWarning,
            )

    def observer(self, ll: Any) -> Tangents:
        """Fresh tangents for one LL run, starting at ``dw_0/dlambda``."""
        return Tangents(self.ul_params, list(ll.ll_model.parameters()))

    def _hypergradient(self, call: Call) -> tuple[Grads, torch.Tensor]:
        trajectory = call.trajectory
        carried = trajectory.observed
        if not isinstance(carried, Carried) or carried.variables != self.ul_params:
            raise ValueError(
                "Forward needs an LL run that carried tangents for its UL parameters: run the "
                "LL with ul.run_ll(ll, data, target) (or ll.run(data, target, "
                "observer=ul.observer(ll))) and pass its .model, or let BilevelProblem(ll, ul) "
                "drive it."
            )
        weights, active = detached_weights(trajectory)
        with evaluate_at(call.auxiliary_model, weights):
            loss = self.ul_loss(call)
        w = [weights[i] for i in active]
        grads = torch.autograd.grad(loss, [*self.ul_params, *w], allow_unused=True)
        direct, v = grads[: len(self.ul_params)], grads[len(self.ul_params) :]
        # the derivative of the loss along each tangent: the real inner product <Z_k, v>
        # (Re sum(conj(Z_k) v) for complex weights; plain Z_k . v for real ones)
        through = sum(
            (z.reshape(z.shape[0], -1).conj() @ vi.reshape(-1)).real
            for z, vi in zip(carried.tangents, v, strict=True)
            if vi is not None
        )
        result: Grads = []
        offset = 0
        for p, d, reached in zip(self.ul_params, direct, carried.reached, strict=True):
            part = None
            size = tangent_count([p])
            if reached and isinstance(through, torch.Tensor):
                part = through[offset : offset + size]
                if p.is_complex():  # along the real parts, then the imaginary parts
                    part = torch.complex(part[: p.numel()], part[p.numel() :])
                part = part.reshape(p.shape)
            offset += size
            result.append(part if d is None else (d if part is None else d + part))
        return result, loss


class Carried:
    """The tangents at the end of an LL run: ``d w_T / d lambda`` for each trainable weight,
    with a leading dimension over the scalars of ``variables``, and for each variable whether
    it has any path to the LL weights."""

    def __init__(self, variables: Tensors, tangents: Tensors, reached: list[bool]) -> None:
        self.variables = variables
        self.tangents = tangents
        self.reached = reached


def _flatten(state: dict[str, Tensors]) -> Tensors:
    return [t for key in sorted(state) for t in state[key]]


def _unflatten(flat: Tensors, like: dict[str, Tensors]) -> dict[str, Tensors]:
    out, i = {}, 0
    for key in sorted(like):
        out[key] = flat[i : i + len(like[key])]
        i += len(like[key])
    return out


class Tangents:
    """The LL-step observer of forward mode: ``Z_{t+1} = A_t Z_t + B_t``.

    ``Z = d(state)/d(lambda)`` for every real scalar of the variables (the optimizer state's
    tangents included: momentum buffers, Adam moments), with ``A_t Z`` and ``B_t`` taken as
    Jacobian-vector products of the step map through a double vector-Jacobian product,
    batched over the scalars. Only one step's graph lives at a time, so memory does not grow
    with the number of steps.

    Args:
        variables: the UL tensors (``lambda``).
        ll_params: the LL model's parameters (those that are variables start with an identity
            tangent: MAML's initial weights).
    """

    detach_inputs = True

    def __init__(self, variables: Tensors, ll_params: Tensors) -> None:
        self.variables = variables
        self.n = tangent_count(variables)
        self.identity: Tensors = []
        offset = 0
        for v in variables:
            units = directions(v)
            eye = torch.zeros(self.n, v.numel(), dtype=v.dtype, device=v.device)
            eye[offset : offset + len(units)] = units
            self.identity.append(eye.reshape(self.n, *v.shape))
            offset += len(units)
        which = {id(v): k for k, v in enumerate(variables)}
        self.tangents = [
            self.identity[which[id(p)]].clone() if id(p) in which else p.new_zeros(self.n, *p.shape)
            for p in ll_params
            if p.requires_grad
        ]
        self.state_tangents: dict[str, Tensors] = {}
        # whether a variable has a path to the LL state yet: as an initial weight, from the start
        self.reached = [any(p is v for p in ll_params) for v in variables]
        #: whether a step was checked for once-differentiable Functions (once per run)
        self.checked_graph = False

    def propagate(self, weights: Tensors, opt_state: dict, new: Tensors, new_state: dict) -> None:
        """Carry the tangents through one step (``weights -> new``)."""
        inputs = [*weights, *_flatten(opt_state), *self.variables]
        tangents = [*self.tangents, *_flatten(self.state_tangents), *self.identity]
        outputs = [*new, *_flatten(new_state)]
        live = [i for i, o in enumerate(outputs) if o.requires_grad]
        if not self.checked_graph:  # once per run (per UL update window online)
            # the products below differentiate the backward of every operation of the step,
            # of the UL variables alone too (a feature map, a step size, a fixed-point map)
            self.checked_graph = True
            refuse_once_differentiable(
                [outputs[i] for i in live], inputs, FORWARD_MODE, "the LL step map", RUN_ONCE
            )
        dummies = [torch.zeros_like(outputs[i], requires_grad=True) for i in live]
        vjps = torch.autograd.grad(
            [outputs[i] for i in live],
            inputs,
            grad_outputs=dummies,
            create_graph=True,
            allow_unused=True,
        )
        n_state = len(inputs) - len(self.variables)
        for k, vjp in enumerate(vjps[n_state:]):
            self.reached[k] = self.reached[k] or vjp is not None
        pairs = [(v, t) for v, t in zip(vjps, tangents, strict=True) if v is not None]
        jvps: tuple = (None,) * len(dummies)
        if pairs:
            jvps = torch.autograd.grad(
                [v for v, _ in pairs],
                dummies,
                grad_outputs=[t for _, t in pairs],
                is_grads_batched=True,
                allow_unused=True,
                retain_graph=True,  # hyperparameters evaluated once per run share their graph
            )
        out = [o.new_zeros(self.n, *o.shape) for o in outputs]
        for i, j in zip(live, jvps, strict=True):
            if j is not None:
                out[i] = j.detach()
        self.tangents = out[: len(new)]
        self.state_tangents = _unflatten(out[len(new) :], new_state)

    def state_dict(self) -> dict[str, Any]:
        """The tangents (of the weights and of the optimizer state) and which variables have
        reached the LL state, as detached copies: what an online run (RTHO) checkpoints."""
        return {
            "tangents": [t.detach().clone() for t in self.tangents],
            "state_tangents": {
                k: [t.detach().clone() for t in v] for k, v in self.state_tangents.items()
            },
            "reached": list(self.reached),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (cast to the dtype and device of the tangents)."""
        saved, reached = state["tangents"], state["reached"]
        if len(saved) != len(self.tangents) or len(reached) != len(self.reached):
            raise ValueError(
                "the saved forward-mode tangents do not fit these UL and LL models (other "
                "numbers of parameters): they were saved by a run of another problem. Resume "
                "with the models that saved them, or start a new run."
            )
        for s, t in zip(saved, self.tangents, strict=True):
            if s.shape != t.shape:
                raise ValueError(
                    f"saved forward-mode tangents of shape {list(s.shape)} do not fit these "
                    f"UL and LL models ({list(t.shape)}): they were saved by a run of another "
                    "problem. Resume with the models that saved them, or start a new run."
                )
        self.tangents = [s.to(t, copy=True) for s, t in zip(saved, self.tangents, strict=True)]
        self.state_tangents = {  # one per trainable weight, as the weights' tangents
            k: [s.to(t, copy=True) for s, t in zip(v, self.tangents, strict=True)]
            for k, v in state["state_tangents"].items()
        }
        self.reached = [bool(r) for r in reached]

    def result(self) -> Carried:
        """The tangents after the last step."""
        return Carried(self.variables, self.tangents, self.reached)

"""The state contract shared by objectives, and the checks on what objectives return.

Objectives are plain callables ``objective(state) -> scalar Tensor``. ``state`` is a dict with
``"data"`` and ``"target"`` (the batch for this level), ``"ul_model"`` (the upper-level module)
and ``"ll_model"`` (the lower-level module; during and after lower-level optimization, the
``higher``-patched module holding the current fast weights).
"""

from __future__ import annotations

import cmath
import contextlib
import functools
import itertools
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Objective = Callable[[dict[str, Any]], torch.Tensor]


def make_state(data: Any, target: Any, ul_model: nn.Module, ll_model: nn.Module) -> dict[str, Any]:
    """Build the dict that objectives receive."""
    return {"data": data, "target": target, "ul_model": ul_model, "ll_model": ll_model}


# --- random draws and modes of an objective's evaluation ---------------------------------


@dataclass(frozen=True)
class Draws:
    """Where torch's global generators stood before an objective's evaluation: the CPU
    generator's state and, for a CUDA device, that device's. Replayed, the evaluation makes
    the same random draws (dropout masks, noise drawn in the objective)."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None
    index: int | None = None

    def same_as(self, other: Draws) -> bool:
        """Whether ``other`` is the same generator state (nothing was drawn in between)."""
        if self.index != other.index or not torch.equal(self.cpu, other.cpu):
            return False
        return self.cuda is None or torch.equal(self.cuda, other.cuda)


def capture_draws(device: torch.device) -> Draws:
    """The state of the generators an evaluation on ``device`` draws from (the CPU one, and
    the device's own for CUDA)."""
    if device.type != "cuda":
        return Draws(torch.get_rng_state())
    index = device.index if device.index is not None else torch.cuda.current_device()
    return Draws(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)


class _Replay:
    """The context of :func:`replay_draws` (a class: it is entered a few times per UL step, and
    a generator-based context manager costs twice as much)."""

    __slots__ = ("draws", "saved_cpu", "saved_cuda")

    def __init__(self, draws: Draws) -> None:
        self.draws = draws

    def __enter__(self) -> _Replay:
        index = self.draws.index
        self.saved_cpu = torch.get_rng_state()
        self.saved_cuda = None if index is None else torch.cuda.get_rng_state(index)
        self.rewind()
        return self

    def rewind(self) -> None:
        """Put the generators back where ``draws`` captured them: the next evaluation makes
        the same draws again (several evaluations with one step's draws)."""
        torch.set_rng_state(self.draws.cpu)
        if self.draws.index is not None:
            torch.cuda.set_rng_state(self.draws.cuda, self.draws.index)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.saved_cpu)
        if self.saved_cuda is not None:
            torch.cuda.set_rng_state(self.saved_cuda, self.draws.index)


def replay_draws(draws: Draws) -> _Replay:
    """Inside, the generators stand where ``draws`` captured them (an evaluation makes the
    draws it made then; ``rewind()`` on the context's value puts them there again for the
    next one); on exit they are back where they were, so that what was drawn inside is not
    drawn from the run's sequence. (What ``torch.random.fork_rng`` does for these generators,
    at a third of its cost: it runs a few times per UL step.)"""
    return _Replay(draws)


def draws_untouched(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Evaluations inside draw from the generators' present state and leave them there (a
    check or a diagnostic that must not change the run's later draws)."""
    return replay_draws(capture_draws(device))


def module_list(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``; a module without children is its only module, listed
    without ``modules()``'s chain of generators (most of the cost for the small models of
    hyperparameter problems, where this runs at every objective evaluation)."""
    if not model._modules and type(model).modules is nn.Module.modules:
        return [model]
    return list(model.modules())


def buffer_copies(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """``(module, name, copy)`` for every buffer of ``model``: what a forward may move in place
    or reassign (batch-norm statistics, spectral norm's power-iteration vectors, a counter).
    A tensor registered at several places has one copy, shared by its places."""
    if not model._buffers and not model._modules and type(model).modules is nn.Module.modules:
        return []  # the usual small model: none
    copies: dict[int, torch.Tensor] = {}
    out = []
    for m in module_list(model):
        for name, b in m._buffers.items():
            if b is not None:
                if id(b) not in copies:
                    copies[id(b)] = b.detach().clone()
                out.append((m, name, copies[id(b)]))
    return out


def put_back(copies: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    """Give each module of ``copies`` its buffer as copied (a fresh copy, so the copies can be
    put back again; places that share a copy share the fresh one, as they shared the
    buffer)."""
    fresh: dict[int, torch.Tensor] = {}
    for module, name, copy in copies:
        if id(copy) not in fresh:
            fresh[id(copy)] = copy.clone()
        module._buffers[name] = fresh[id(copy)]


class _KeptModes:
    """The context of :func:`modes_kept` (a class, as :class:`_Replay`: it is entered at every
    objective evaluation of a UL method)."""

    __slots__ = ("flag", "flags", "model", "modules")

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        model = self.model
        if not model._modules and type(model).modules is _MODULES:  # its only module
            self.modules = None
            self.flag = model.training
            return
        self.modules = module_list(model)
        self.flags = list(map(_TRAINING, self.modules))

    def __exit__(self, *exc: object) -> None:
        if self.modules is None:
            if self.model.training is not self.flag:
                self.model.training = self.flag
            return
        if list(map(_TRAINING, self.modules)) == self.flags:  # the usual case: none switched
            return
        for m, flag in zip(self.modules, self.flags, strict=True):
            if m.training != flag:
                m.training = flag


_TRAINING = operator.attrgetter("training")
_MODULES = nn.Module.modules


def modes_kept(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """The training flags of ``model``'s modules as they were on entry, restored on exit: an
    objective that switches ``state["ll_model"]`` to eval mode does so for its own
    evaluation only, and the method's later evaluations run in the LL run's mode."""
    return _KeptModes(model)


def check_objective_result(value: Any, name: str, graph: bool = True) -> torch.Tensor:
    """Check that an objective returned a real floating-point scalar tensor that carries a
    graph (``graph=False``: an evaluation without one, which only compares or reports it).

    Finiteness is not checked here (that needs a host sync); callers check it where a sync is
    already paid for.

    Raises:
        TypeError: ``value`` is not a tensor.
        ValueError: ``value`` is not a scalar, or has no graph to the parameters.
    """
    if isinstance(value, torch.Tensor) and value.ndim == 0 and (value.requires_grad or not graph):
        if value.is_floating_point():  # the usual case, in one test (a 0-d tensor is a scalar)
            return value
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must return a scalar torch.Tensor, but it returned {type(value).__name__}."
        )
    if value.numel() != 1:
        raise ValueError(
            f"{name} must return a scalar, but it returned a tensor of shape "
            f"{tuple(value.shape)}; reduce it with .mean() or .sum()."
        )
    if graph and not value.requires_grad:
        raise ValueError(
            f"{name} returned a tensor with no path to any parameter (requires_grad=False): "
            "compute it from state['ll_model'] and/or state['ul_model'], without .detach(), "
            ".item() or torch.no_grad()."
        )
    if value.is_complex():
        raise TypeError(
            f"{name} must return a real loss, got a complex one ({value.dtype}): reduce complex "
            "residuals to a real number, e.g. (r.real**2 + r.imag**2).mean()."
        )
    if not value.is_floating_point():
        raise TypeError(f"{name} must return a floating-point tensor, got dtype {value.dtype}.")
    return value if value.ndim == 0 else value.reshape(())


def has_none(values: Iterable[Any]) -> bool:
    """Whether any of ``values`` is ``None`` (gradients with no path), by identity tests run in
    C (``None in values`` would compare tensors with ``==``)."""
    return any(map(_is_none, values))


_is_none = functools.partial(operator.is_, None)

#: ``tensor.requires_grad`` as a function that ``map`` and ``filter`` run in C (hot paths)
requires_grad = operator.attrgetter("requires_grad")


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether no entry is NaN or inf, in one host sync: finite entries have a finite sum, and
    an infinite sum (finite entries can overflow to one) is looked into entry by entry. (A
    complex sum is a Python complex, finite when both its parts are: ``cmath.isfinite``.)"""
    if len(tensors) == 1:  # one tensor: its own sum (no stack)
        (only,) = tensors
        return cmath.isfinite(only.sum().item()) or bool(torch.isfinite(only).all())
    total = torch.stack([t.sum() for t in tensors]).sum()
    return cmath.isfinite(total.item()) or all(bool(torch.isfinite(t).all()) for t in tensors)


def check_hypergradient(grads: Sequence[torch.Tensor]) -> None:
    """Raise ``FloatingPointError`` if a hypergradient holds NaN or inf (one host sync)."""
    if grads and not all_finite(grads):
        raise FloatingPointError(
            "the hypergradient is not finite (NaN or inf): an objective whose derivative is "
            "infinite or undefined where it is taken (sqrt or log at 0, a division by zero), "
            "or values that overflow. Check the objectives there, or lower the learning rates."
        )


def check_finite(value: torch.Tensor, what: str) -> None:
    """Raise ``FloatingPointError`` if ``value`` holds NaN or inf (one host sync)."""
    if not all_finite([value]):
        raise FloatingPointError(
            f"{what} is not finite ({value.detach().flatten()[:4].tolist()}). Lower the "
            "learning rate, check the data for NaN, or check the objective for log(0) or "
            "division by zero."
        )


class LowerLevelDivergenceError(FloatingPointError):
    """An LL run whose loss grew from its first step to its last: its result must not reach
    the UL (a UL step taken at the weights of a diverging LL moves the UL parameters by
    orders of magnitude, even while every number stays finite).

    Raised by :class:`bilevel.ll.GradientDescent` (``on_growth="raise"``, the default);
    :class:`bilevel.BilevelProblem` skips the UL step instead under ``on_nonfinite="skip"``.

    Attributes:
        first: the LL loss before the first step.
        last: the LL loss before the last step.
        iters: LL steps in the run.
        lambda_max: the LL Hessian's largest eigenvalue at the start weights, estimated by
            power iteration (``None`` if not estimated).
        safe_lr: a step size that is stable for plain gradient descent on the local quadratic
            model, ``1 / lambda_max`` (``None`` for other update rules, or without an
            estimate: halve the step size until the loss decreases over the run).
    """

    def __init__(
        self,
        message: str,
        *,
        first: float | None = None,
        last: float | None = None,
        iters: int | None = None,
        lambda_max: float | None = None,
        safe_lr: float | None = None,
    ) -> None:
        super().__init__(message)
        self.first = first
        self.last = last
        self.iters = iters
        self.lambda_max = lambda_max
        self.safe_lr = safe_lr


def trainable_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of ``model`` that require grad; raise if there are none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{name} has no parameters that require grad; wrap the variables to optimize in "
            "nn.Parameter inside the module."
        )
    return params


def parameter_names(model: nn.Module, params: Iterable[torch.Tensor]) -> list[str]:
    """Names of ``params`` in ``model`` (for error messages)."""
    lookup = {id(p): n for n, p in model.named_parameters()}
    return [lookup.get(id(p), f"<parameter {i}>") for i, p in enumerate(params)]


def names_without_gradient(
    model: nn.Module, grads: Sequence[torch.Tensor | None], index: Sequence[int]
) -> list[str]:
    """Names of the parameters of ``model`` at positions ``index`` whose gradient in ``grads``
    (one per position) is ``None``: those the objective did not read (for error messages)."""
    if not has_none(grads):
        return []
    missing = [i for i, g in zip(index, grads, strict=True) if g is None]
    params = list(model.parameters())
    return parameter_names(model, [params[i] for i in missing])


def check_precision(dtype: torch.dtype, where: str) -> None:
    """Refuse a floating-point dtype below 32 bits (float16, bfloat16, float8, complex32): the
    library's round-off floors (``bilevel.roundoff.ROUNDOFF * eps``: PTT's ties, the LL's
    stationarity, the series' divergence certificate) are 10% to 80% of a value there, and an
    LL step below ``eps / 2`` of a weight is lost, so results would be silently wrong."""
    if not (dtype.is_floating_point or dtype.is_complex) or torch.finfo(dtype).bits >= 32:
        return  # (a complex dtype's finfo is its parts': complex32 has 16-bit parts)
    raise ValueError(
        f"{where} has dtype {dtype} (eps {torch.finfo(dtype).eps:.1e}), but bilevel computes "
        "in float32 or float64: in half precision its round-off checks cannot tell noise from "
        "signal and LL steps smaller than eps/2 of a weight are lost, so hypergradients "
        "would be silently wrong. Convert the models and the data with .float() (or "
        ".double())."
    )


def check_same_device_and_dtype(**models: nn.Module) -> None:
    """Raise if the floating-point (or complex) parameters of the given modules differ in
    device or dtype, or are of a floating-point dtype below 32 bits (:func:`check_precision`)."""
    seen: dict[str, tuple[str, torch.device, torch.dtype]] = {}
    for name, model in models.items():
        _refuse_meta(name, model)
        for pname, p in model.named_parameters():
            if not (p.is_floating_point() or p.is_complex()):
                continue
            key = "first"
            if key not in seen:
                check_precision(p.dtype, f"{name}.{pname}")
                seen[key] = (f"{name}.{pname}", p.device, p.dtype)
                continue
            ref_name, device, dtype = seen[key]
            if p.device != device:
                raise ValueError(
                    f"{name}.{pname} is on {p.device} but {ref_name} is on {device}; move every "
                    f"model to one device with .to(device) before building the bilevel problem."
                )
            if p.dtype != dtype:
                raise ValueError(
                    f"{name}.{pname} has dtype {p.dtype} but {ref_name} has {dtype}; convert "
                    f"every model to one dtype, e.g. model.to(torch.{str(dtype).split('.')[-1]})."
                )


def _refuse_meta(name: str, model: nn.Module) -> None:
    """Raise if a parameter or buffer of ``model`` is on the meta device: shapes without
    values, which no LL step can update and no copy can move (``.to(device)`` fails on
    them)."""
    for tname, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            raise ValueError(
                f"{name}.{tname} is on the meta device (a shape without values). Give the "
                "model memory and values first: model.to_empty(device='cpu') (or your device), "
                "then initialize it (reset_parameters() on its layers, or load_state_dict with "
                "trained weights), then build the bilevel problem."
            )


def tensor_leaves(value: Any, name: str) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor in ``value``: a tensor, or tuples, lists and dicts of
    them (``None`` and other leaves are skipped), named as they are reached, e.g.
    ``data["x"]`` or ``data[1]``."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from tensor_leaves(item, f"{name}[{key!r}]")
    elif isinstance(value, tuple | list):
        for i, item in enumerate(value):
            yield from tensor_leaves(item, f"{name}[{i}]")


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any], leaf: Callable[[Any], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, through tuples (named ones kept),
    lists and dicts; any other leaf goes to ``leaf``."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if type(value) is dict:  # the common case, before the slower abstract-class check
        return {k: map_tensors(v, fn, leaf) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(map_tensors(v, fn, leaf) for v in value))
    if isinstance(value, tuple | list):
        return type(value)(map_tensors(v, fn, leaf) for v in value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn, leaf) for k, v in value.items()}
    return leaf(value)


def check_data_matches(
    data: Any, reference: torch.Tensor, name: str, index: int | None = None
) -> None:
    """Raise if a data tensor (or one inside nested data: tuples, lists, dicts) lives on
    another device, or is floating point or complex of another precision than the models
    (``float64`` and ``complex128`` are one precision: real data with complex models, or
    complex data with real ones, is the objectives' choice). Messages name it ``name``, or
    ``name[index]`` with an ``index`` (formatted only when needed)."""
    if isinstance(data, torch.Tensor) and data.device == reference.device:
        if data.dtype == reference.dtype:  # the usual case, a match, in one test
            return
        if not (data.is_floating_point() or data.is_complex()):
            return
    if index is not None:
        name = f"{name}[{index}]"
    if isinstance(data, torch.Tensor):
        leaves: Iterable[tuple[str, torch.Tensor]] = ((name, data),)
    else:
        leaves = tensor_leaves(data, name)
    precision = reference.dtype.to_real()
    for where, tensor in leaves:
        if tensor.device != reference.device:
            raise ValueError(
                f"{where} is on {tensor.device} but the models are on {reference.device}; move "
                f"it with .to({str(reference.device)!r})."
            )
        if tensor.is_floating_point() and tensor.dtype != precision:
            raise ValueError(
                f"{where} has dtype {tensor.dtype} but the models have {reference.dtype}; "
                f"convert it with .to({precision})."
            )
        if tensor.is_complex() and tensor.dtype.to_real() != precision:
            raise ValueError(
                f"{where} has dtype {tensor.dtype} but the models have {reference.dtype}: the "
                f"objectives would mix two precisions; convert it with "
                f".to({precision.to_complex()})."
            )

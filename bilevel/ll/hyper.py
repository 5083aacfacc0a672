"""The LL's hyperparameters (step size, momentum, betas, ...): checked once, evaluated per run.

A hyperparameter is a number, a 0-d tensor (a UL leaf that receives a hypergradient), a
per-step schedule (a 1-d tensor of length ``iters``), a list with one value per LL parameter
tensor, in which a tensor shaped like its parameter is a per-element value (Meta-SGD's
learned step sizes), or a callable ``ul_model -> value`` evaluated at the start of every LL
run (``lr=lambda ul: ul.log_lr.exp()``), so that a value computed from UL parameters is never
stale and its graph is fresh at every run. Values are checked against their range at
construction and, for those the UL steps move (callables, tensors that require grad), again
at every run: a learned step size driven below zero is refused, not run, except learned
per-element step sizes (Meta-SGD's, whose sign sets each weight's direction), which are
checked for finiteness and said once when an entry is at or below zero.

A 1-d parameter of length ``iters`` makes an unmarked value of that shape ambiguous (a
per-step schedule, or per-element values?): :class:`PerElement` and :class:`PerStep` say
which is meant. They wrap a tensor or a callable (whose returned value may also be wrapped),
as the whole value or as an item of the per-parameter list, and are checked against their
parameter's shape and ``iters``; an unambiguous value means the same with or without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bilevel.ll.rules import LR_BOUND, Bound
from bilevel.user_warnings import warn_user

__all__ = ["LR_BOUND", "Hyper", "Schedule", "check", "check_device"]

SCALAR, SCHEDULE, ELEMENTWISE = "scalar", "schedule", "elementwise"


def _interval(bound: Bound) -> str:
    return f"{'[' if bound.closed_low else '('}{bound.low}, {bound.high})"


class _Marked:
    """A value marked with its kind (see :class:`PerElement`, :class:`PerStep`)."""

    kind = ""
    expected = ""
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        name = type(self).__name__
        if isinstance(value, _Marked):
            raise TypeError(f"{name} wraps a tensor or a callable, got {value!r}.")
        if not (isinstance(value, list | tuple | torch.Tensor) or callable(value)):
            raise TypeError(
                f"{name} wraps {self.expected}, a callable ul_model -> such a tensor, or a "
                f"list of them (one per LL parameter tensor), got {_short(value)}."
            )
        self.value = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_short(self.value)})"


class PerElement(_Marked):
    """Marks a hyperparameter value as per-element: a tensor shaped like its parameter, one
    value per weight (Meta-SGD's learned step sizes, Li et al. 2017), or a callable
    ``ul_model -> tensor`` returning one. Give it as an item of the per-parameter list
    (``lr=[PerElement(t) for t in ul.lrs]``), or wrap the whole list
    (``lr=PerElement(list(ul.lrs))``).

    Only needed where a 1-d parameter's length equals ``iters`` (a 5-way head's bias with 5
    LL steps), which makes an unmarked value of that shape ambiguous; elsewhere a value
    shaped like its parameter is per-element already, marked or not.
    """

    kind = ELEMENTWISE
    expected = "a tensor shaped like its parameter"


class PerStep(_Marked):
    """Marks a hyperparameter value as a per-step schedule: a 1-d tensor of length ``iters``
    (one value per LL step), or a callable ``ul_model -> tensor`` returning one; as the whole
    value (shared by all parameters), as an item of the per-parameter list, or wrapping the
    whole list.

    Only needed where a 1-d parameter's length equals ``iters``, which makes an unmarked value
    of that shape ambiguous; elsewhere a 1-d tensor of length ``iters`` is a schedule already.
    """

    kind = SCHEDULE
    expected = "a 1-d tensor of length iters"


def _short(value: Any) -> str:
    """A value in a few words (a tensor by its shape: it may hold thousands of entries)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if callable(value):
        return "a callable"
    return (
        repr(value) if isinstance(value, int | float | bool | type(None)) else type(value).__name__
    )


def _marker_name(mark: str | None) -> str:
    return "PerElement" if mark == ELEMENTWISE else "PerStep"


def _unmark(value: Any) -> tuple[Any, str | None]:
    """A value without its marker, and the kind the marker gives (``None``: unmarked)."""
    if isinstance(value, _Marked):
        return value.value, value.kind
    return value, None


def _marked_kind(value: Any, what: str, iters: int, shape: torch.Size | None, mark: str) -> str:
    """The kind of a value marked ``mark``, checked against ``iters`` or its parameter."""
    marker = _marker_name(mark)
    if mark == ELEMENTWISE and shape is None:
        raise ValueError(
            f"{what} is marked {marker}, but it is not given per parameter: per-element "
            f"values come one per LL parameter tensor, as a list [{marker}(t), ...] (or "
            f"{marker}([t, ...]) around the whole list)."
        )
    if not isinstance(value, torch.Tensor):
        expected = "its parameter's shape" if mark == ELEMENTWISE else f"shape ({iters},)"
        raise TypeError(
            f"{what} is marked {marker}: it must be a tensor of {expected}, got {_short(value)}."
        )
    if not value.is_floating_point():
        raise TypeError(f"{what} tensor must be floating point, got {value.dtype}.")
    if mark == ELEMENTWISE and value.shape != shape:
        raise ValueError(
            f"{what} is marked {marker} but has shape {tuple(value.shape)}, not its "
            f"parameter's shape {tuple(shape)}."
        )
    if mark == SCHEDULE and value.shape != (iters,):
        raise ValueError(
            f"{what} is marked {marker} but has shape {tuple(value.shape)}; a per-step "
            f"schedule of {iters} steps (iters) has shape ({iters},)."
        )
    return mark


def kind_of(
    value: Any, what: str, iters: int, shape: torch.Size | None, mark: str | None = None
) -> str:
    """Whether a value is a scalar, a per-step schedule or a per-element value (``shape``:
    the parameter's shape when the value is for one parameter, else ``None``; ``mark``: the
    kind a :class:`PerElement` or :class:`PerStep` marker gave it, checked)."""
    if isinstance(value, torch.Tensor) and value.is_complex():
        raise ValueError(
            f"{what} is complex ({value.dtype}), but the LL steps' hyperparameters (step "
            "sizes, momenta, decays) are real numbers: a complex step size turns the gradient, "
            "and the step is no descent step (its imaginary part was silently used, and "
            "dropped where it was range-checked). Give a real value of the models' precision "
            f"({value.dtype.to_real()}); a learned one as its real part, e.g. "
            "lr=lambda ul: ul.log_lr.real.exp()."
        )
    if mark is not None:
        return _marked_kind(value, what, iters, shape, mark)
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return SCALAR
    if not value.is_floating_point():
        raise TypeError(f"{what} tensor must be floating point, got {value.dtype}.")
    schedule = value.shape == (iters,)
    elementwise = shape is not None and value.shape == shape
    if schedule and elementwise:
        raise ValueError(
            f"{what} has shape {tuple(value.shape)}, both a per-step schedule of {iters} steps "
            "and its parameter's shape: say which is meant with bilevel.ll.PerElement(value) "
            "(one value per element of the parameter, as Meta-SGD's step sizes) or "
            "bilevel.ll.PerStep(value) (one value per LL step), as the list's item or around "
            "a callable (a callable may also return its value so marked)."
        )
    if schedule or elementwise:
        return SCHEDULE if schedule else ELEMENTWISE
    expected = f"a scalar or a per-step schedule of shape ({iters},)"
    if shape is not None:
        expected += f", or its parameter's shape {tuple(shape)}"
    raise ValueError(f"{what} has shape {tuple(value.shape)}; expected {expected}.")


def _outside(values: list[Any], bound: Bound) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The values flattened (one host sync for all of them) and the mask of those outside
    ``bound`` (non-finite ones included). Python numbers are read in float64 (torch's
    default float32 made a step size of 1e-50, for an LL objective of scale 1e50, a 0, and
    one of 1e40 inf)."""
    flat = [torch.as_tensor(v, dtype=torch.float64).detach().reshape(-1).cpu() for v in values]
    every = torch.cat(flat)
    low_ok = (every >= bound.low) if bound.closed_low else (every > bound.low)
    return flat, ~(low_ok & (every < bound.high) & torch.isfinite(every))


def _shown(flat: list[torch.Tensor], outside: torch.Tensor) -> str:
    """The values, or for many (per-element ones) how many are outside and the extremes."""
    if outside.numel() <= 12:
        return str([v.tolist() for v in flat] if len(flat) > 1 else flat[0].tolist())
    bad = torch.cat(flat)[outside]
    return (
        f"{int(outside.sum())} of {outside.numel()} values outside it "
        f"(from {float(bad.min()):.4g} to {float(bad.max()):.4g})"
    )


def _check_range(values: list[Any], name: str, bound: Bound) -> None:
    """Refuse values outside ``bound``."""
    flat, outside = _outside(values, bound)
    if bool(outside.any()):
        raise ValueError(f"{name} must lie in {_interval(bound)}, got {_shown(flat, outside)}.")


#: where learned per-element step sizes may lie: anywhere finite (Meta-SGD's may turn negative)
FINITE = Bound(-float("inf"), float("inf"), closed_low=False)


def _meta_sgd_step_sizes(name: str, kind: str | None) -> bool:
    """Learned per-element step sizes: Meta-SGD's, which may turn negative."""
    return name == "lr" and kind == ELEMENTWISE


@dataclass
class Hyper:
    """One hyperparameter as given, checked: per-parameter ``items`` (or one shared item)."""

    name: str
    items: list[Any]
    per_parameter: bool
    bound: Bound
    shapes: list[torch.Size]
    kinds: list[str | None]  # per item, known at check; ``None`` for callables (per run)
    warned_negative: bool = False  # the learned per-element step sizes' warning, given once
    #: per item, the kind its PerElement / PerStep marker gave (``None``: unmarked); ``items``
    #: hold the values without their markers
    marks: list[str | None] | None = None

    def _shape(self, index: int) -> torch.Size | None:
        return self.shapes[index] if self.per_parameter else None

    def resolve(
        self, ul_model: nn.Module, iters: int, reference: torch.Tensor
    ) -> list[tuple[Any, str]]:
        """The values for this run, with their kinds: callables evaluated on ``ul_model``."""
        values, moved, signed = [], [], []
        marks = self.marks or [None] * len(self.items)
        for i, (item, kind) in enumerate(zip(self.items, self.kinds, strict=True)):
            if kind is None:
                item, mark = _unmark(item(ul_model))
                what = f"{self.name} (the value its callable returned)"
                if mark is not None and marks[i] is not None and mark != marks[i]:
                    raise ValueError(
                        f"{what} is marked {_marker_name(mark)}, but its callable is wrapped "
                        f"in {_marker_name(marks[i])}: mark it once."
                    )
                mark = mark or marks[i]
                if isinstance(item, int | float) and not isinstance(item, bool):
                    item = float(item)
                elif not isinstance(item, torch.Tensor):
                    raise TypeError(f"{what} must be a tensor or a float, got {type(item)}.")
                else:
                    _check_placement(item, what, reference)
                kind = kind_of(item, what, iters, self._shape(i), mark)
                if _meta_sgd_step_sizes(self.name, kind):
                    signed.append(item)
                else:
                    _check_range([item], what, self.bound)
            elif isinstance(item, torch.Tensor) and item.requires_grad:
                # a UL variable: the UL steps move it
                (signed if _meta_sgd_step_sizes(self.name, kind) else moved).append(item)
            values.append((item, kind))
        # checked again at every run, as callables' values are (a learned step size driven
        # below zero ran silently)
        if moved:
            _check_range(moved, f"{self.name} (a UL variable, as the UL steps left it)", self.bound)
        if signed:
            self._check_signed(signed)
        return values

    def _check_signed(self, values: list[torch.Tensor]) -> None:
        """Learned per-element step sizes: finite, and any at or below zero said once.
        Meta-SGD learns each weight's direction as well as its step (Li et al. 2017, "Meta-SGD:
        Learning to Learn Quickly for Few-Shot Learning"): a negative entry is its choice, and
        refusing it would end the run."""
        flat, outside = _outside(values, self.bound)
        if not bool(outside.any()):  # the usual case: one host sync
            return
        what = f"{self.name} (learned per-element step sizes, as the UL steps left them)"
        _check_range(flat, what, FINITE)
        if not self.warned_negative:
            self.warned_negative = True
            warn_user(
                f"{what} has entries outside {_interval(self.bound)}: "
                f"{_shown(flat, outside)}. A step size "
                "below zero moves its weight up its gradient; Meta-SGD allows it (its step "
                "sizes set each weight's direction as well as its step size), so the run goes "
                "on. If they must stay positive, learn their logarithm, one callable per LL "
                "parameter: lr=[lambda ul, i=i: ul.log_lrs[i].exp() for i in range(n)]. "
                "(Said once.)",
                RuntimeWarning,
            )


def check(value: Any, name: str, bound: Bound, iters: int, shapes: list[torch.Size]) -> Hyper:
    """Validate a hyperparameter as given (see the module docstring); ``shapes`` are those of
    the trainable LL parameters."""
    outer, outer_mark = _unmark(value)
    if outer_mark is not None and isinstance(outer, list | tuple):
        value = [type(value)(v) for v in outer]  # a marked list: each of its items marked
    per_parameter = isinstance(value, list | tuple)
    items = list(value) if per_parameter else [value]
    if per_parameter and len(items) != len(shapes):
        raise ValueError(
            f"{name} is a sequence of {len(items)} values, but the LL model has {len(shapes)} "
            "trainable parameter tensors: give one value per tensor, or a single value."
        )
    fixed, learned, kinds, marks = [], [], [], []
    for i, given in enumerate(items):
        item, mark = _unmark(given)
        if isinstance(item, list | tuple):  # (validated by the marker otherwise)
            raise TypeError(
                f"{name}: {_marker_name(mark)} wraps a list only as the whole value, got a "
                "list inside the per-parameter list."
            )
        items[i] = item
        marks.append(mark)
        if callable(item) and not isinstance(item, torch.Tensor):
            if mark == ELEMENTWISE and not per_parameter:
                kind_of(item, name, iters, None, mark)  # raises: not per parameter
            kinds.append(None)
            continue
        if isinstance(item, bool) or not isinstance(item, int | float | torch.Tensor):
            raise TypeError(
                f"{name} must be a float, a tensor, a callable ul_model -> tensor, or a list of "
                f"them (a tensor or callable may be marked bilevel.ll.PerElement or PerStep), "
                f"got {type(item).__name__}."
            )
        if isinstance(item, torch.Tensor) and item.grad_fn is not None:
            raise TypeError(
                f"{name} is a tensor computed from other tensors (it has a grad_fn, e.g. "
                "ul.log_lr.exp()): it would be used stale after the UL step changes its "
                "inputs, and its graph would be reused across runs. Pass a callable instead: "
                f"{name}=lambda ul: ul.log_lr.exp(), evaluated at every LL run."
            )
        kind = kind_of(item, name, iters, shapes[i] if per_parameter else None, mark)
        kinds.append(kind)
        if (
            isinstance(item, torch.Tensor)
            and item.requires_grad
            and _meta_sgd_step_sizes(name, kind)
        ):
            learned.append(item)  # Meta-SGD's: of either sign (said at each run, once), finite
        else:
            fixed.append(item)
    if fixed:
        _check_range(fixed, name, bound)
    if learned:  # (a trained Meta-SGD model, loaded before its LL optimizer is built)
        _check_range(learned, f"{name} (learned per-element step sizes)", FINITE)
    items = [float(i) if isinstance(i, int | float) else i for i in items]
    marked = marks if any(m is not None for m in marks) else None
    return Hyper(name, items, per_parameter, bound, shapes, kinds, marks=marked)


def _check_placement(item: torch.Tensor, what: str, reference: torch.Tensor) -> None:
    """Refuse a hyperparameter tensor on another device than the LL model's, or floating
    point of another precision (the LL would run with its value rounded); a complex model's
    hyperparameters are real, of its parts' dtype (float64 for complex128)."""
    if item.device != reference.device:
        raise ValueError(
            f"{what} is on {item.device} but ll_model is on {reference.device}; keep the UL "
            "model and the LL model on one device."
        )
    real = reference.dtype.to_real()
    if item.is_floating_point() and item.dtype != real:
        raise ValueError(
            f"{what} has dtype {item.dtype} but ll_model has {reference.dtype}: the LL steps "
            f"would mix the two precisions. Give it in {real} (e.g. "
            f"torch.tensor(0.1, dtype={real})), or as a Python number."
        )


def check_device(hyper: Hyper, reference: torch.Tensor) -> None:
    """Refuse tensors on another device than the LL model's, or floating point of another
    dtype."""
    for item in hyper.items:
        if isinstance(item, torch.Tensor):
            _check_placement(item, hyper.name, reference)


class Schedule:
    """The resolved hyperparameters of one LL run, looked up per step and per parameter.

    Args:
        values: name -> (resolved ``(value, kind)`` items, whether they are per parameter).
        n: number of trainable LL parameter tensors.
    """

    def __init__(self, values: dict[str, tuple[list[tuple[Any, str]], bool]], n: int) -> None:
        self.values = values
        self.n = n
        kinds = [kind for items, _ in values.values() for _, kind in items]
        self.constant = SCHEDULE not in kinds
        self._cache = {d: self._lookup(0, d) for d in (False, True)} if self.constant else None

    def _lookup(self, step: int, detach: bool) -> dict[str, list[Any]]:
        out = {}
        for name, (items, per_parameter) in self.values.items():
            row = []
            for i in range(self.n):
                value, kind = items[i] if per_parameter else items[0]
                if kind == SCHEDULE:
                    value = value[step]
                if detach and isinstance(value, torch.Tensor):
                    value = value.detach()
                row.append(value)
            out[name] = row
        return out

    def at(self, step: int, detach: bool) -> dict[str, list[Any]]:
        """Each hyperparameter's value at ``step``, one per trainable parameter tensor."""
        if self._cache is not None:
            return self._cache[detach]
        return self._lookup(step, detach)

    def plain_sgd_lrs(self) -> list[float] | None:
        """The step sizes, when every hyperparameter is a constant float (plain SGD then
        takes ``w - lr * g`` directly). Worked out once per schedule (it does not change)."""
        if "_plain_lrs" in self.__dict__:
            return self._plain_lrs
        lrs = None
        if self._cache is not None:
            hyper = self._cache[True]
            if all(isinstance(v, float) for row in hyper.values() for v in row):
                lrs = hyper["lr"]
        self._plain_lrs = lrs
        return lrs

"""Settings of the methods and LL dynamics set after construction: checked as the constructor
checks them, or refused where a change could not be honored.

A :class:`Setting` is a class attribute that routes every assignment, the constructor's and a
user's between steps (``ul.eta = 0.1``), through one check, and stores the checked value in the
private slot ``_<name>``, which hot paths read directly. A :class:`Fixed` attribute takes its
value once, in the constructor, and refuses any later assignment with ``AttributeError``,
naming why and the cure (build a new object); it is read as a plain attribute. A setting
changed after construction is counted in ``_settings_changes``, so that what the runner
checked once against the other level (the LL optimizer against the UL method) is checked
again at its next step (``HypergradientCalculator.check_against_once``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def check_count(value: Any, name: str) -> int:
    """``value`` if it is an integer >= 1 (a bool is not one): iterations, steps, periods."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


def count_change(obj: Any) -> None:
    """Count a setting of ``obj`` changed after construction (for settings kept by hand-written
    properties; :class:`Setting` counts its own)."""
    state = obj.__dict__
    state["_settings_changes"] = state.get("_settings_changes", 0) + 1


class _Slot:
    """An attribute kept in the instance's private slot ``_<name>``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, f"_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.slot]
        except KeyError:  # (not yet set: the constructor has not come to it)
            raise AttributeError(self.name) from None


class Setting(_Slot):
    """A setting that may be changed between steps, checked exactly as at construction.

    ``check(value, name, *options, **keywords)`` returns the value to keep (converted:
    ``float(value)``) or raises with the constructor's words. With ``reads_object=True`` it
    is called as ``check(obj, value)`` instead: a method, for a setting constrained by others
    (a lower bound not above an upper one), which reads them from their slots (a slot not yet
    set: the constructor has not come to it). A refused value leaves the object as it was."""

    def __init__(
        self,
        check: Callable[..., Any],
        *options: Any,
        reads_object: bool = False,
        **keywords: Any,
    ) -> None:
        self.check = check
        self.options = options
        self.keywords = keywords
        self.reads_object = reads_object

    def __set__(self, obj: Any, value: Any) -> None:
        if self.reads_object:
            value = self.check(obj, value)
        else:
            value = self.check(value, self.name, *self.options, **self.keywords)
        if self.slot in obj.__dict__:  # a change after construction
            count_change(obj)
        obj.__dict__[self.slot] = value


class Fixed:
    """A setting fixed at construction: the constructor's assignment stores it (after
    ``check(value, name, *options)``, where one is given); a later one raises
    ``AttributeError`` with ``reason`` (why a change could not be honored) and the cure
    (``cure``; by default, build a new object).

    The value is kept in the instance's ``__dict__`` under the attribute's own name and this
    class defines no ``__get__``: reading it is a plain attribute read (the models, parameter
    lists and objectives are read throughout every step), only an assignment comes here."""

    def __init__(
        self,
        reason: str,
        check: Callable[..., Any] | None = None,
        *options: Any,
        cure: str | None = None,
    ) -> None:
        self.reason = reason
        self.check = check
        self.options = options
        self.cure = cure

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __set__(self, obj: Any, value: Any) -> None:
        if self.name in obj.__dict__:
            owner = type(obj).__name__
            cure = self.cure or (
                f"To change it, build a new {owner} with {self.name}=... (and a new "
                "BilevelProblem)."
            )
            raise AttributeError(
                f"{owner}.{self.name} is fixed at construction: {self.reason}. {cure}"
            )
        if self.check is not None:
            value = self.check(value, self.name, *self.options)
        obj.__dict__[self.name] = value


def current(obj: Any) -> dict[str, Any]:
    """The values of ``obj``'s settings now, by name (those set so far): its :class:`Setting`
    attributes and its properties with a setter that keep their value in ``_<name>`` (an LL
    optimizer's ``iters``, ``FiniteDifference.r``)."""
    names = {
        name
        for klass in type(obj).__mro__
        for name, attribute in vars(klass).items()
        if isinstance(attribute, Setting)
        or (isinstance(attribute, property) and attribute.fset is not None)
    }
    state = obj.__dict__
    return {name: state[f"_{name}"] for name in sorted(names) if f"_{name}" in state}

"""The ``higher``-patched copy of the LL model through which objectives see the fast weights.

Everything that touches ``higher`` is in this module: creating the patched copy, syncing it
with the user's module at every LL run, giving it fast weights, and reading them back.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import higher
import torch
from torch import nn

Tensors = list[torch.Tensor]


def _parameter_slots(module: nn.Module) -> list[tuple[dict, dict, str]]:
    """Where a patched model's fast weights go, ``(parameter dict, attributes, name)``, in the
    order of ``higher``'s expanded parameter list (a module's own, then its children's).
    ``attributes`` is the module's instance ``__dict__`` (:func:`install` writes the weight
    there too), or a dict of the module's own for a class that serves attributes itself
    (its ``__getattr__`` or ``__getattribute__``), which an instance entry would bypass. Each
    module keeps the slots of its subtree, for the check its calls make
    (:func:`_at_fast_weights`)."""
    kind = type(module)
    reads_instance = (
        kind.__getattr__ is nn.Module.__getattr__
        and kind.__getattribute__ is object.__getattribute__
    )
    attributes = module.__dict__ if reads_instance else {}
    slots = [(module._parameters, attributes, name) for name in module._param_names]
    for child in module._modules.values():
        if child is not None:
            slots += _parameter_slots(child)
    module.__dict__["_bilevel_subtree"] = tuple(zip(*slots, strict=True)) if slots else None
    return slots


def parameter_list(module: nn.Module) -> Tensors:
    """``list(module.parameters())`` by a direct walk over the modules' parameter dicts: the
    same tensors in the same order (a module's own, then its children's, depth first; a
    shared module or parameter once), without ``named_modules``' chain of generators (this
    runs at every LL run). A module that overrides ``parameters`` is asked instead."""
    kind = type(module)
    if kind.parameters is not nn.Module.parameters or (
        kind.named_parameters is not nn.Module.named_parameters
    ):
        return list(module.parameters())
    if not module._modules:  # a module without children: its own parameters, each once
        params = list(filter(_is_not_none, module._parameters.values()))
        if len(params) < 2 or len(set(map(id, params))) == len(params):
            return params
    params = []
    seen_params: set[int] = set()
    seen_modules: set[int] = set()

    def walk(m: nn.Module) -> None:
        seen_modules.add(id(m))
        for p in m._parameters.values():
            if p is not None and id(p) not in seen_params:
                seen_params.add(id(p))
                params.append(p)
        for child in m._modules.values():
            if child is not None and id(child) not in seen_modules:
                walk(child)

    walk(module)
    return params


_is_not_none = functools.partial(operator.is_not, None)


def install(model: nn.Module, params: Sequence[torch.Tensor]) -> None:
    """Give a patched model the fast weights ``params``: what ``higher``'s ``update_params``
    does, without its per-call walk over the modules (this runs at every LL step that keeps a
    graph), and without its history of the weights of every earlier step (kept when it tracks
    higher-order gradients): the autograd graph keeps what a hypergradient needs, and holding
    the history measured 10-23% slower per step. The model holds the latest weights only.

    Each weight goes into its module's parameter slot and into its instance ``__dict__``
    under its name (:func:`_parameter_slots`), where an attribute read
    (``state["ll_model"].w``, ``self.weight`` in a forward) finds it without
    ``nn.Module.__getattr__``, a Python call from C that also slowed the torch operations
    after it (a PTT or BDA UL step on ridge and logistic regression 3-5% faster, measured in
    one process). The patched forwards then need nothing of ``higher``'s per-call work
    (:func:`_at_fast_weights`). Every write to the slots goes through here (``higher``'s
    ``update_params`` is this function on a patched model); a call of the model reads the
    slots for itself where a write did not (``torch.func.functional_call``)."""
    own = model.__dict__  # (past the patched module's slow __setattr__)
    slots = own.get("_bilevel_slots") or _slots(model)
    own["_fast_params"] = [list(params)]  # what higher's fast_params reads
    for held, attributes, name, index in slots:
        held[name] = attributes[name] = params[index]


def release_weights(model: nn.Module) -> None:
    """Drop the fast weights from a patched model's parameter slots: the last weights of a
    run hold, through their graph, every step of it that the hypergradient did not
    back-propagate through (PTT's steps after the one it picks), which a released model
    would otherwise keep alive until its next run."""
    for held, attributes, name, _ in model.__dict__.get("_bilevel_slots") or ():
        held[name] = None
        attributes.pop(name, None)


def _slots(model: nn.Module) -> list[tuple[dict, dict, str, int]]:
    """The slots of a patched model's fast weights, ``(parameter dict, attributes, name,
    index into the fast weights)`` (:func:`_parameter_slots`), made once and kept in it."""
    own = model.__dict__
    slots = own.get("_bilevel_slots")
    if slots is None:
        mapping = model._param_mapping  # a shared weight fills several slots
        places = zip(_parameter_slots(model), mapping, strict=True)
        slots = [(held, attributes, name, i) for (held, attributes, name), i in places]
        own["_bilevel_slots"] = slots
    return slots


def fast_weights(model: nn.Module) -> Tensors:
    """The fast weights a patched model holds (one per parameter of the user's module)."""
    params = model.__dict__.get("_fast_params")
    if not params:
        raise _released()
    return list(params[-1])


def is_released(model: nn.Module) -> bool:
    """Whether a patched model was handed back with ``ll.release`` (it holds no weights)."""
    return "_fast_params" in model.__dict__ and model.__dict__["_fast_params"] is None


#: what :func:`sync_from` leaves to the patched copy: the parameter, buffer and child slots
#: (filled on their own), a recurrent layer's list of its weights (rebuilt at every call), and
#: a compiled call (``module.compile()``), which would run the user's module itself
_OWN_SLOTS = frozenset(
    {
        "_parameters",
        "_buffers",
        "_modules",
        "_flat_weights",
        "_flat_weight_refs",
        "_compiled_call_impl",
    }
)


_MISSING = object()


class ModelChanged(ValueError):
    """``ll_model``'s structure changed since its patched copy was made (a submodule of
    another kind, parameters added or removed): the copy must be made again."""


def sync_from(
    model: nn.Module, patched: nn.Module, copies: dict[int, torch.Tensor] | None = None
) -> None:
    """Make the patched copy the user's module again in all but its weights, at every LL run:
    the buffers (batch-norm running statistics, copied), the training flags and every other
    plain attribute (a temperature, a dropout rate, set on the user's module between runs),
    and the hooks (``higher`` copies none, so a forward hook, a pruning mask or a weight
    normalization would be skipped). Nothing an objective does to the patched model
    (``.eval()``, moving its running statistics) leaks into the next run. A compiled module
    (``module.compile()``) runs uncompiled here: its compiled call is the user's module's.

    The walk follows the child modules by name, so a submodule registered at two places (one
    copy in the patched model per place) is synced at both; a buffer tensor registered at
    several places gets one copy, shared by them as the user's module shares it (``copies``:
    those made so far in the walk). A module whose class or parameter names changed since it
    was patched (a submodule swapped for another kind, pruning applied later) raises
    :class:`ModelChanged`: its patched copy would run the old structure (the LL optimizer then
    patches the model again)."""
    kind = type(patched).__bases__[0]  # the user's class (a plain container's: _Container)
    if kind is _Container:
        kind = nn.Module
    if kind is not type(model) or patched._param_names != [
        name for name, p in model._parameters.items() if p is not None
    ]:
        raise ModelChanged(
            f"ll_model changed since the LL optimizer patched it: a {type(model).__name__} with "
            f"parameters {[n for n, p in model._parameters.items() if p is not None]} where its "
            f"copy is a {kind.__name__} with {patched._param_names} "
            "(a submodule replaced by another kind, parameters added or removed): patch it "
            "again (GradientDescent does so by itself)."
        )
    copies = {} if copies is None else copies
    for key, value in model._buffers.items():
        if torch.is_tensor(value):
            if id(value) not in copies:
                copies[id(value)] = value.clone().detach()
            value = copies[id(value)]
        patched._buffers[key] = value
    mine, copy = model.__dict__, patched.__dict__
    if not _same_attributes(mine, copy):
        for key, value in mine.items():  # (past the patched module's slow __setattr__)
            if key not in _OWN_SLOTS and copy.get(key, _MISSING) is not value:
                copy[key] = value
    if "_compiled_call_impl" in copy:  # (copied by higher when it patched a compiled module)
        del copy["_compiled_call_impl"]
    children = patched._modules
    for name, child in model._modules.items():
        if child is None:
            continue
        if children.get(name) is None:
            raise ModelChanged(
                f"ll_model has a submodule {name!r} that the copy the LL optimizer patched "
                "lacks (added since): patch it again (GradientDescent does so by itself)."
            )
        sync_from(child, children[name], copies)


def _same_attributes(mine: dict[str, Any], copy: dict[str, Any]) -> bool:
    """Whether the patched copy's attributes (``copy``, its ``__dict__``) are already the user
    module's (``mine``) in every slot that :func:`sync_from` copies, object for object: the
    usual case at every LL run, told by comparisons that run in C (the keys, then the values
    through an ``itemgetter`` kept on the copy, rebuilt when the user's keys change)."""
    keys = tuple(mine)
    kept = copy.get("_bilevel_synced_keys")
    if kept is None or kept[0] != keys:
        synced = [key for key in keys if key not in _OWN_SLOTS]
        kept = (keys, operator.itemgetter(*synced) if len(synced) > 1 else None)
        copy["_bilevel_synced_keys"] = kept
    values = kept[1]
    if values is None:
        return False
    try:
        return all(map(operator.is_, values(mine), values(copy)))
    except KeyError:  # an attribute the copy lacks (deleted by an objective): copy it
        return False


class _Container(nn.Module):
    """What a plain ``nn.Module()`` holding submodules or parameters (``self.inner =
    nn.Module()``) is patched as: ``higher`` derives each patched class from the module's
    class and its own subclass of ``nn.Module``, which ``nn.Module`` itself cannot be
    combined with (Python finds no method resolution order)."""


_SWAPPING = threading.Lock()


def patch(model: nn.Module) -> nn.Module:
    """A new patched copy of ``model`` (creates classes: milliseconds; reuse it, with
    :func:`sync_from` at every run).

    While the copy is made, what ``higher`` cannot copy is taken out of the user's modules
    and put back afterwards: a ``None`` child (``register_module(name, None)``; ``higher``
    recursed into it) and a module kept as a plain attribute, not registered (a UL submodule
    that the LL forward uses without training it; ``higher`` registered it in the copy and
    then failed on it). The copy gets its ``None`` children here, and the plain attributes
    from :func:`sync_from`."""
    modules = dict(model.named_modules())
    plain = [m for m in modules.values() if type(m) is nn.Module]
    empty = [
        (path, name) for path, m in modules.items() for name, c in m._modules.items() if c is None
    ]
    loose = [
        (m, key, value)
        for m in modules.values()
        for key, value in list(m.__dict__.items())
        if isinstance(value, nn.Module)
    ]
    with _SWAPPING:  # (another thread patching the model would see the classes swapped)
        try:
            for module in plain:  # only while the copy is made: the user's classes put back
                module.__class__ = _Container
            for path, name in empty:
                del modules[path]._modules[name]
            for module, key, _ in loose:
                del module.__dict__[key]
            patched = higher.monkeypatch(model, copy_initial_weights=True, track_higher_grads=False)
        finally:
            for module in plain:
                module.__class__ = nn.Module
            for path, name in empty:
                modules[path]._modules[name] = None
            for module, key, value in loose:
                module.__dict__[key] = value
    copies = dict(patched.named_modules())
    for path, name in empty:
        copies[path]._modules[name] = None
    kind = type(patched)  # the class is this copy's own
    kind.parameters = _latest_parameters
    kind.update_params = install
    for module in patched.modules():  # (each patched module has a class of its own)
        cls = type(module)
        cls.forward = _at_fast_weights(cls.__mro__[1].forward)  # the user's class's forward
    return patched


_PARAMS_REFUSED = (
    "state['ll_model'] (or one of its submodules) was called with params=...: that would "
    "replace the fast weights of the LL run. Call it on the data alone; to evaluate other "
    "weights, use torch.func.functional_call(model, {name: weight}, args) or "
    "bilevel.ll.evaluate_at(model, weights)."
)
#: the warning a recurrent layer gives on the GPU at every call with weights that are not one
#: block (fast weights never are); higher silences it too
_RNN_NOT_FLAT = "RNN module weights are not part of single contiguous chunk of memory"


def _at_fast_weights(forward: Callable[..., Any]) -> Callable[..., Any]:
    """The forward of a patched module: the user's class's ``forward``, which reads the fast
    weights that :func:`install` put in the instance. ``higher``'s own per-call forward set
    every weight again through ``__setattr__``, entered two contexts and probed for a
    recurrent layer, in every module at every call: 51 us a call of the linear model of
    ``benchmarks/objective_overhead.py`` against 14 us for the user's module (AMD EPYC, one
    thread); now about the user's module's time. Slots of the module or of a module below it
    (whose weights its forward may read) that hold other tensors than the instance entries,
    as ``torch.func.functional_call`` swaps in, are read for the call
    (:func:`_at_swapped_weights`). Refused: ``params=`` (``higher``'s, which would replace the
    LL run's fast weights with the caller's) and a model released with ``ll.release``."""

    def at_fast_weights(self: nn.Module, *args: Any, params: Any = None, **kwargs: Any) -> Any:
        if params is not None:
            raise TypeError(_PARAMS_REFUSED)
        own = self.__dict__
        subtree = own.get("_bilevel_subtree")  # (parameter dicts, attributes, names)
        if subtree is not None:  # the weights of this module and those below it (in C)
            held, attributes, slot_names = subtree
            now = map(operator.getitem, held, slot_names)
            if not all(map(operator.is_, now, map(dict.get, attributes, slot_names))):
                return _at_swapped_weights(forward, self, subtree, args, kwargs)
            if held[0][slot_names[0]] is None:
                raise _released()
        names = own.get("_flat_weights_names")
        if names is None:
            return forward(self, *args, **kwargs)
        return _recurrent(forward, self, names, args, kwargs)

    return at_fast_weights


def _at_swapped_weights(
    forward: Callable[..., Any],
    module: nn.Module,
    subtree: tuple[tuple[dict, ...], tuple[dict, ...], tuple[str, ...]],
    args: tuple,
    kwargs: dict[str, Any],
) -> Any:
    """A call while the parameter slots of ``module``'s subtree hold other tensors than the
    instance entries that its forward reads: ``torch.func.functional_call`` (or
    ``torch.nn.utils.stateless``) on the patched model or on a submodule, from an objective
    or from a forward (a hypernetwork), swaps the caller's tensors into the slots. The
    forward then computes with them, as a plain module's does: the entries (and the root's
    list that its ``parameters()`` gives) are set to the slots for the call and put back
    afterwards, before the caller puts the slots back. (``higher``'s forward put the LL run's
    weights back over them: the call computed with the run's weights, silently.) Refused
    where it cannot be the user's module's computation (:func:`_swapped_entries`,
    :func:`_refuse_reads_outside_forward`)."""
    changes = _swapped_entries(subtree)
    _refuse_reads_outside_forward(module)
    own = module.__dict__
    slots, kept = own.get("_bilevel_slots"), own.get("_fast_params")
    if slots is not None and kept:  # the root: parameters() gives the slots' tensors too
        current = list(kept[-1])
        for held, _, name, index in slots:
            current[index] = held[name]
        own["_fast_params"] = [current]
    undo = []
    for entries, name, value in changes:
        undo.append((entries, name, entries.get(name, _ABSENT)))
        entries[name] = value
    try:
        flat = own.get("_flat_weights_names")
        if flat is None:
            return forward(module, *args, **kwargs)
        return _recurrent(forward, module, flat, args, kwargs)
    finally:
        for entries, name, entry in reversed(undo):
            if entry is _ABSENT:
                entries.pop(name, None)
            else:
                entries[name] = entry
        if slots is not None and kept:
            own["_fast_params"] = kept


def _swapped_entries(
    subtree: tuple[tuple[dict, ...], tuple[dict, ...], tuple[str, ...]],
) -> list[tuple[dict, str, Any]]:
    """The instance entries to set for a call with swapped slots, ``(entries, name, the
    slot's tensor)``. Refused: an empty slot whose entry is gone (a released model; a
    ``None`` given for a weight of a live model is taken, as a plain module takes it), and
    different tensors in the slots of one weight of the run (a module or a parameter
    registered at two places: the user's module may have one slot where the patched model
    has one per place, so that ``tie_weights=False`` with one of the names would reach every
    place there and one place here)."""
    held, attributes, names = subtree
    changes, given = [], {}
    for slots, entries, name in zip(held, attributes, names, strict=True):
        value, entry = slots[name], entries.get(name, _ABSENT)
        if entry is _ABSENT:
            if value is None:
                raise _released()
        elif given.setdefault(id(entry), value) is not value:
            raise TypeError(_SPLIT_SWAP_REFUSED)
        if entry is not value:
            changes.append((entries, name, value))
    return changes


def _refuse_reads_outside_forward(module: nn.Module) -> None:
    """Refuse a swapped call of a module that may read its weights outside ``forward``, before
    or after the call sets them: forward hooks (its own or global ones) and an own
    ``__call__``. Called on a module above it, the hooks run inside that call."""
    hooks = nn.modules.module
    kind = type(module)
    if (
        module._forward_pre_hooks
        or module._forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_forward_hooks
        or kind.__call__ is not nn.Module.__call__
        or kind._call_impl is not nn.Module._call_impl
    ):
        raise TypeError(_OUTSIDE_FORWARD_REFUSED.format(kind=kind.__mro__[1].__name__))


_ABSENT = object()
_OUTSIDE_FORWARD_REFUSED = (
    "torch.func.functional_call straight on a {kind} of state['ll_model'] that may read its "
    "weights outside its forward (forward hooks: torch.nn.utils.prune, the hook-based "
    "spectral_norm / weight_norm; or a __call__ of its own), before or after the call gives "
    "it the caller's weights: there it would read the LL run's. Call functional_call on a "
    "module above it (its hooks then run inside the call), use "
    "bilevel.ll.evaluate_at(state['ll_model'], weights), or the parametrizations of "
    "torch.nn.utils.parametrizations in place of the hooks."
)
_SPLIT_SWAP_REFUSED = (
    "torch.func.functional_call gave different tensors to one weight of the LL run that sits "
    "at several places of state['ll_model'] (a module or a parameter registered at two "
    "places, with tie_weights=False): the patched model holds a copy per place where your "
    "module may hold one, and the two would compute differently. Pass tie_weights=True "
    "(functional_call's default) or the same tensor under each name, or use "
    "bilevel.ll.evaluate_at(state['ll_model'], weights)."
)


def _recurrent(
    forward: Callable[..., Any], module: nn.Module, names: list[str], args: tuple, kwargs: dict
) -> Any:
    """A call of a recurrent layer, which reads its weights from ``_flat_weights``: the list is
    built from the slots at each call."""
    own = module.__dict__
    own["_flat_weights"] = [own["_parameters"][name] for name in names]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _RNN_NOT_FLAT, UserWarning)
        return forward(module, *args, **kwargs)


def _released() -> ValueError:
    """The refusal of a released model's call."""
    return ValueError(
        "this auxiliary model was released (ll.release) and holds no weights; use the "
        "result of a new ll.optimize call."
    )


def _latest_parameters(
    self: nn.Module, recurse: bool = True, time: int | None = None
) -> Iterator[torch.Tensor]:
    """``parameters()`` of a patched model: its fast weights, as ``nn.Module.parameters``
    gives the user's module's weights (``recurse=False``: the root module's own only, where
    ``higher`` gives them all). Only the latest weights are held (see :func:`install`), so
    ``time`` (``higher``'s index into a history of weights) other than the latest refuses
    rather than answering with the latest."""
    if time is not None and time != -1:
        raise ValueError(
            f"parameters(time={time}): the patched LL model holds only its latest fast weights "
            "(time=None or -1); keep the weights you need, e.g. the initial ones from "
            "state['ul_model'] or ll_model."
        )
    if not recurse:
        return nn.Module.parameters(self, recurse=False)
    return iter(fast_weights(self))


class _EvaluatedAt:
    """The context of :func:`evaluate_at` (a class: UL methods enter it at every UL step, and a
    generator-based context manager costs twice as much)."""

    __slots__ = ("model", "saved", "weights")

    def __init__(self, model: nn.Module, weights: Sequence[torch.Tensor]) -> None:
        self.model = model
        self.weights = weights

    def __enter__(self) -> None:
        self.saved = fast_weights(self.model)
        install(self.model, list(self.weights))

    def __exit__(self, *exc: object) -> None:
        install(self.model, self.saved)


def evaluate_at(
    auxiliary_model: nn.Module, weights: Sequence[torch.Tensor]
) -> contextlib.AbstractContextManager[None]:
    """Temporarily give an auxiliary model other fast weights (e.g. detached copies).

    The model's own fast weights are restored on exit.
    """
    return _EvaluatedAt(auxiliary_model, weights)


@functools.cache
def _weight_norm_second_derivatives_right() -> bool:
    """Whether ``torch._weight_norm`` (behind ``weight_norm``) has right second derivatives
    in this PyTorch: a Hessian-vector product of a small loss through it against the same
    through ``g * v / ||v||`` (float64, CPU; once per process). PyTorch 2.13 on CPU fails it
    (``gradgradcheck`` fails too: its Hessian is not even symmetric)."""
    generator = torch.Generator().manual_seed(0)
    v, g, x = (
        torch.randn(*s, generator=generator, dtype=torch.float64) for s in ((2, 3), (2, 1), (4, 3))
    )
    products = []
    for weight in (
        lambda v, g: torch._weight_norm(v, g, 0),
        lambda v, g: g * v / v.norm(dim=1, keepdim=True),
    ):
        vg = [v.clone().requires_grad_(), g.clone().requires_grad_()]
        loss = torch.tanh(x @ weight(*vg).T).pow(2).sum()
        first = torch.autograd.grad(loss, vg, create_graph=True)
        products.append(
            torch.cat([h.reshape(-1) for h in torch.autograd.grad(sum(t.sum() for t in first), vg)])
        )
    return bool(torch.allclose(products[0], products[1], rtol=1e-8, atol=1e-10))


def _uses_weight_norm(model: nn.Module) -> bool:
    """Whether a module of ``model`` is weight-normalized (``parametrizations.weight_norm``
    or the older hook-based ``torch.nn.utils.weight_norm``)."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return any(
        isinstance(m, _WeightNorm)
        or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())
        for m in model.modules()
    )


def refuse_broken_weight_norm(model: nn.Module) -> None:
    """Refuse second derivatives through a weight-normalized patched model where PyTorch's
    ``torch._weight_norm`` gets them wrong (they would enter the hypergradient silently);
    checked once per patched model."""
    refused = model.__dict__.get("_bilevel_weight_norm_refused")
    if refused is None:
        refused = _uses_weight_norm(model) and not _weight_norm_second_derivatives_right()
        model.__dict__["_bilevel_weight_norm_refused"] = refused
    if refused:
        raise ValueError(
            f"ll_model uses weight_norm, whose second derivatives are wrong in this PyTorch "
            f"({torch.__version__}: torch._weight_norm fails gradgradcheck), and this "
            "hypergradient differentiates the LL gradient: it would be silently wrong. "
            "Write the weight as g * v / v.norm(dim=1, keepdim=True) in a custom "
            "parametrization (torch.nn.utils.parametrize.register_parametrization), or use "
            "FiniteDifference or FirstOrder (first derivatives only)."
        )

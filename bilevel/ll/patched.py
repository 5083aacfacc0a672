"""The ``higher``-patched copy of the LL model through which objectives see the fast weights.

Everything that touches ``higher`` is in this module: creating the patched copy, syncing it
with the user's module at every LL run, giving it fast weights, and reading them back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import higher
import torch
from torch import nn

Tensors = list[torch.Tensor]


def _parameter_slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Where a patched model's fast weights live, ``(submodule, name)``, in the order of
    ``higher``'s expanded parameter list (a module's own, then its children's)."""
    slots = [(module, name) for name in module._param_names]
    for child in module._modules.values():
        if child is not None:
            slots += _parameter_slots(child)
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
    params: Tensors = []
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


def install(model: nn.Module, params: Sequence[torch.Tensor]) -> None:
    """Give a patched model the fast weights ``params``: what ``higher``'s ``update_params``
    does, without its per-call walk over the modules (this runs at every LL step that keeps a
    graph), and without its history of the weights of every earlier step (kept when it tracks
    higher-order gradients): the autograd graph keeps what a hypergradient needs, and holding
    the history measured 10-23% slower per step. The model holds the latest weights only."""
    slots = model.__dict__.get("_bilevel_slots")
    if slots is None:  # (submodule, name, index into params), once per model
        mapping = model._param_mapping  # a shared weight fills several slots
        places = zip(_parameter_slots(model), mapping, strict=True)
        slots = [(m, name, i) for (m, name), i in places]
        model._bilevel_slots = slots
    model.__dict__["_fast_params"] = [list(params)]  # what higher's fast_params reads
    for module, name, index in slots:
        module._parameters[name] = params[index]
    box = model.__dict__.get("_bilevel_params_box")
    if box is None:
        box = model.__dict__["_bilevel_params_box"] = _params_box(model)
    box[0] = None  # the next direct call of a submodule reads these weights


def _params_box(model: nn.Module) -> list:
    """``higher``'s box of the expanded fast weights that a patched submodule reads: filled
    from the root's fast weights when a submodule is called directly (not through the whole
    model), and emptied only at the end of a call of the whole model. Left filled, a later
    direct call (the next objective evaluation, the next run) would read the weights of an
    earlier step; :func:`install` empties it. It is the one list that the patched classes'
    ``direct_submodule_call`` closes over (``higher`` 0.2.1)."""
    prop = getattr(type(model), "direct_submodule_call", None)
    cells = getattr(getattr(prop, "fget", None), "__closure__", None) or ()
    for cell in cells:
        contents = cell.cell_contents
        if isinstance(contents, list) and len(contents) == 1:
            return contents
    raise RuntimeError(
        f"the patched model ({type(model).__name__}) has no parameter box where higher 0.2.1 "
        "keeps one: this version of higher is not supported (pip install higher==0.2.1)."
    )


def fast_weights(model: nn.Module) -> Tensors:
    """The fast weights a patched model holds (one per parameter of the user's module)."""
    params = model.__dict__.get("_fast_params")
    if not params:
        raise ValueError(
            "this auxiliary model was released (ll.release) and holds no weights; use the "
            "result of a new ll.optimize call."
        )
    return list(params[-1])


def is_released(model: nn.Module) -> bool:
    """Whether a patched model was handed back with ``ll.release`` (it holds no weights)."""
    return "_fast_params" in model.__dict__ and model.__dict__["_fast_params"] is None


def sync_from(model: nn.Module, patched: nn.Module) -> None:
    """Copy what the patched copy carries of the user's module besides its parameters: the
    buffers (batch-norm running statistics) and the training flags, at every LL run, so that
    an objective that called ``.eval()`` on the patched model, or a run that moved its running
    statistics, never leaks into the next run."""
    higher.patch.buffer_sync(model, patched)
    for mine, copy in zip(model.modules(), patched.modules(), strict=True):
        if copy.training is not mine.training:  # (a patched module's __setattr__ is slow)
            copy.training = mine.training


def patch(model: nn.Module) -> nn.Module:
    """A new patched copy of ``model`` (creates classes: milliseconds; reuse it)."""
    # no history of earlier weights is kept (see install), so higher's own readers of it
    # (parameters(time=t), init_fast_params) refuse rather than answer wrongly
    return higher.monkeypatch(model, copy_initial_weights=True, track_higher_grads=False)


@contextlib.contextmanager
def evaluate_at(auxiliary_model: nn.Module, weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily give an auxiliary model other fast weights (e.g. detached copies).

    The model's own fast weights are restored on exit.
    """
    saved = fast_weights(auxiliary_model)
    install(auxiliary_model, list(weights))
    try:
        yield
    finally:
        install(auxiliary_model, saved)

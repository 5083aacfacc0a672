"""Second derivatives that PyTorch leaves out without an error, and their refusal.

A ``torch.autograd.Function`` whose backward is marked ``once_differentiable`` gives its
gradient no graph (PyTorch's wrapper runs the backward under ``no_grad``; the error node it
attaches is reached by ``.backward()``, never by ``torch.autograd.grad``), and
``torch.compile``'s ``CompiledFunction`` (AOTAutograd) has no double backward: a method that
differentiates a gradient through either (Hessian-vector products, mixed second derivatives,
LL steps kept with a graph) silently leaves their terms out. The methods that do so refuse
them here, by one walk over the objective's graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import BackwardCFunction, Function, once_differentiable

from bilevel.ll.patched import refuse_broken_weight_norm

#: the code of the wrapper that ``once_differentiable`` puts around a Function's backward
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__
_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad

#: the methods that need first derivatives of the objectives only (the cure named below)
FIRST_ORDER_METHODS = (
    "FirstOrder, Reptile, FiniteDifference, IGA, BOME, PBGD (penalty='value'), BVFIM, MESO, "
    "GAFFO, F2SA or Alternating"
)


def _compiled(cls: Any) -> bool:
    """Whether the ``torch.autograd.Function`` class ``cls`` is the ``CompiledFunction`` that
    ``torch.compile`` makes (AOTAutograd: every backend but ``"eager"``), which has no double
    backward: PyTorch raises only where the engine runs its backward's backward, and
    ``torch.autograd.grad`` does not where the inputs of its backward carry no graph (a
    compiled loss: the gradient has no graph through it, as a once-differentiable one's)."""
    return cls.__name__ == "CompiledFunction" and cls.__module__.startswith("torch._functorch")


def _once_differentiable(node: Any) -> bool:
    """Whether the autograd node ``node`` is a ``torch.autograd.Function`` whose backward (or
    ``vjp``, its alias) is marked ``once_differentiable`` (under other decorators too), or
    ``torch.compile``'s ``CompiledFunction``."""
    if not isinstance(node, BackwardCFunction):  # a built-in operation (one test in C)
        return False
    cls = node._forward_cls
    vjp = getattr(cls, "vjp", None)
    fn = vjp if vjp is not None and vjp is not Function.vjp else getattr(cls, "backward", None)
    for _ in range(8):  # the chain of functools.wraps
        if getattr(fn, "__code__", None) is _ONCE_DIFFERENTIABLE:
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            break
    return _compiled(cls)


def _first_order_node(
    loss: torch.Tensor | Sequence[torch.Tensor], through: Sequence[torch.Tensor] | None
) -> Any:
    """The node of :func:`once_differentiable_in`'s Function, or ``None``."""
    stops: set[Any] = set()
    leaves: set[int] = set()
    for t in through or ():
        if t.grad_fn is not None:
            stops.add(t.grad_fn)
        else:
            leaves.add(id(t))
    stack = [loss.grad_fn] if isinstance(loss, torch.Tensor) else [t.grad_fn for t in loss]
    seen = {None, *stops}  # (the stops are not entered)
    found, pop, push, add = [], stack.pop, stack.append, seen.add
    while stack:  # the hot loop (every node of the graph): no generators, one set test
        node = pop()
        if node in seen:
            continue
        add(node)
        if isinstance(node, BackwardCFunction) and _once_differentiable(node):
            if through is None:
                return node
            found.append(node)
        for child, _ in node.next_functions:
            push(child)
    visited: set[Any] = set()  # shared: a node that reaches no weight does so for every start
    for start in found:
        stack = [child for child, _ in start.next_functions]
        while stack:
            node = stack.pop()
            if node is None or node in visited:
                continue
            visited.add(node)
            if node in stops or (type(node) is _ACCUMULATE_GRAD and id(node.variable) in leaves):
                return start
            stack.extend(child for child, _ in node.next_functions)
    return None


def once_differentiable_in(
    loss: torch.Tensor | Sequence[torch.Tensor], through: Sequence[torch.Tensor] | None = None
) -> str | None:
    """The name of a ``torch.autograd.Function`` in ``loss``'s graph (or that of several
    tensors) whose backward is marked ``once_differentiable``, or of ``torch.compile``'s
    ``CompiledFunction``, or ``None``.

    With ``through`` (the weights that a method differentiates the gradient in), only a
    Function with one of them upstream counts (one the gradient in them passes through), and
    the walk stops at them: the graph of earlier LL steps behind weights that carry one is not
    walked again, and a Function that reads only the UL variables (a feature extractor of the
    UL model) is allowed, as its backward is then run once only. One walk over the nodes of
    ``loss``'s graph (a second, from each Function found, only when one is found)."""
    node = _first_order_node(loss, through)
    return None if node is None else node._forward_cls.__name__


def refuse_once_differentiable(
    loss: torch.Tensor | Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    who: str,
    objective: str = "ll_objective",
    others: str = f"a method that needs first derivatives only: {FIRST_ORDER_METHODS}",
) -> None:
    """Refuse an ``objective`` value ``loss`` whose gradient in ``weights`` passes through a
    ``torch.autograd.Function`` marked ``once_differentiable`` (or ``torch.compile``'s), where
    ``who`` differentiates that gradient (Hessian-vector products, mixed second derivatives,
    LL steps kept with a graph, forward mode's derivatives of vector-Jacobian products):
    PyTorch would leave the Function's terms out of the second derivatives without an error
    (``Implicit`` with CG on ridge: 231% off the exact hypergradient). ``others``: the
    methods the message offers instead.

    Where it is checked: once per LL run whose steps are differentiated, at its first step
    kept with a graph (the LL gradient, BDA's aggregated direction, forward mode's whole step
    map) or the first step ``MemorySavingReverse`` recomputes (online: once per UL update
    window); at the first transposed product of ``Implicit(method="normal_cg")`` on a
    fixed-point map, and at every residual, Hessian-vector product or gradient penalty of
    the other second-order methods (``Implicit``, ``StochasticImplicit``, ``DM``, the
    stochastic methods, ``PBGD(penalty="gradient")``). So a Function that an objective takes
    from some LL run (or window) on is refused there, but one taken in the middle of a run
    whose steps are differentiated is not seen before the next. The walk
    (:func:`once_differentiable_in`) visits the nodes of one evaluation of the objective once
    and stops at the weights (6 us on a 20-64-64-5 MLP, 14 us on the 4-conv few-shot net, one
    CPU thread; at every step it was 10-40 us per LL step on ridge and logistic regression, as
    much as the step's own Python work, hence once per run).

    Raises:
        ValueError: naming the Function and the cure.
    """
    node = _first_order_node(loss, weights)
    if node is None:
        return
    name = node._forward_cls.__name__
    if _compiled(node._forward_cls):
        what = (
            f"a torch.compile'd function (AOTAutograd's {name}), which has no double backward: "
            "PyTorch raises only where it runs that backward's backward, which it skips where "
            "the gradient has no graph through it"
        )
        cure = (
            "Call that code without torch.compile, or compile it with backend='eager' (no "
            "AOTAutograd: the operations keep their second derivatives)"
        )
    else:
        what = (
            f"the torch.autograd.Function {name}, whose backward is marked once_differentiable: "
            "PyTorch gives its result no graph and raises nothing"
        )
        cure = (
            f"Write {name}.backward with differentiable torch operations "
            "(without @once_differentiable)"
        )
    raise ValueError(
        f"{who} differentiates the gradient of {objective} (second derivatives), but that "
        f"gradient passes through {what}, so the second derivatives would leave {name}'s terms "
        f"out and the hypergradient would be silently wrong. {cure}, or use {others}."
    )


def gradient_to_differentiate(
    loss: torch.Tensor,
    weights: Sequence[torch.Tensor],
    model: nn.Module,
    who: str,
    objective: str = "ll_objective",
) -> list[torch.Tensor | None]:
    """``loss``'s gradient in ``weights`` with its graph, for ``who``, a method that
    differentiates it (Hessian-vector products, mixed second derivatives), after refusing what
    PyTorch would differentiate wrongly without an error: ``model`` weight-normalized in this
    PyTorch (``bilevel.ll.patched.refuse_broken_weight_norm``), or a once-differentiable
    or compiled Function on the gradient's path (:func:`refuse_once_differentiable`).
    ``None`` where a weight has no path."""
    refuse_broken_weight_norm(model)
    refuse_once_differentiable(loss, weights, who, objective)
    return list(torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True))

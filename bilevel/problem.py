"""BilevelProblem: composes a lower-level optimizer and an upper-level calculator."""

from __future__ import annotations

import contextlib
import copy
import itertools
import operator
import os
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bilevel import checkpoint as ckpt
from bilevel import distributed
from bilevel.ll import GradientDescent, PerElement, PerStep
from bilevel.settings import check_count, count_change, current
from bilevel.state import (
    all_finite,
    check_data_matches,
    check_hypergradient,
    check_precision,
    map_tensors,
    module_list,
    tensor_leaves,
)
from bilevel.ul.base import check_ul_parameters, kept_buffers, put_back_buffers
from bilevel.user_warnings import warn_user

Pair = tuple[Any, Any]
Batch = Pair | tuple[Pair, Pair] | dict[str, Pair]


def _scalar(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A loss as a 0-d tensor of ``dtype`` (itself when it is one)."""
    return value if value.dtype == dtype and value.ndim == 0 else value.to(dtype).reshape(())


def check_pair(pair: Any, name: str) -> None:
    """Raise if ``pair`` is not a ``(data, target)`` pair (a tuple or list of two)."""
    if isinstance(pair, (tuple, list)) and len(pair) == 2:  # (types in a tuple: no union built)
        return
    if isinstance(pair, torch.Tensor):
        what = f"a tensor of shape {tuple(pair.shape)}"
    elif isinstance(pair, tuple | list):
        what = f"a {type(pair).__name__} of {len(pair)} item(s)"
    else:
        what = f"a {type(pair).__name__}"
    raise TypeError(
        f"{name} must be a pair (data, target), got {what}. Pass ({name}_x, {name}_y); give "
        "None as the target if the objective does not read state['target']."
    )


def split_tasks(batch: dict[str, Pair]) -> list[tuple[Pair, Pair]]:
    """Split a task batch ``{"train": (x, y), "test": (x, y)}`` (leading task dimension, as
    torchmeta's loaders give) into a list of ``(train, val)`` pairs, one per task.

    Every tensor of the batch (also inside nested data: tuples, lists and dicts of tensors;
    a target may be ``None``) has a task dimension and an example dimension first: data of
    shape ``(tasks, examples, ...)`` and targets of shape ``(tasks, examples, ...)``, all with
    the same number of tasks, and data and target of a pair with the same number of examples.
    (A 2-D ``x`` of shape ``(40, 5)`` with ``y`` of shape ``(40,)`` is one task of 40
    examples, not 40 tasks: it is refused, not run as 40 one-example tasks.) Task ``i`` takes
    row ``i`` of every tensor, whatever the nesting.
    """
    if not isinstance(batch, dict) or "train" not in batch or "test" not in batch:
        raise TypeError('a task batch must be a dict {"train": (x, y), "test": (x, y)}.')
    for key in ("train", "test"):
        check_pair(batch[key], f'batch["{key}"]')
    leaves = []
    for key in ("train", "test"):
        x, y = batch[key]
        for i, member in enumerate((x, y)):
            leaves += tensor_leaves(member, f'batch["{key}"][{i}]')
        both = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
        if both and x.ndim >= 2 and y.ndim >= 2 and x.shape[1] != y.shape[1]:
            raise ValueError(
                f'batch["{key}"] has data of shape {tuple(x.shape)} and targets of shape '
                f"{tuple(y.shape)}: their second dimensions (examples per task) differ. Data "
                "and targets need shapes (tasks, examples, ...)."
            )
    if not leaves:
        raise TypeError("a task batch holds no tensor: it needs tensors with a task dimension.")
    for name, t in leaves:
        if t.ndim < 2:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}: a task batch needs a task dimension and an "
                "example dimension first, data of shape (tasks, examples, ...) and targets of "
                "shape (tasks, examples, ...). For one task, call step(train, val) / "
                "hypergradient(train, val); for several, stack them."
            )
    n = leaves[0][1].shape[0]
    for name, t in leaves:
        if t.shape[0] != n:
            raise ValueError(
                f"task batch {name} has {t.shape[0]} tasks along its first dimension, expected {n}."
            )
    members = [(batch[key][j], f'batch["{key}"][{j}]') for key in ("train", "test") for j in (0, 1)]

    def task(i: int) -> list[Any]:  # row i of every tensor; other leaves are shared
        return [map_tensors(v, lambda t: t[i], partial(_refuse_array, name)) for v, name in members]

    tasks = [task(i) for i in range(n)]
    return [((tx, ty), (vx, vy)) for tx, ty, vx, vy in tasks]


def _refuse_array(name: str, leaf: Any) -> Any:
    """Refuse an array that is not a tensor (NumPy's) in a task batch: only tensors are split
    by task, and every task would get the whole array."""
    if hasattr(leaf, "__array__") and getattr(leaf, "ndim", 0):
        raise TypeError(
            f"{name} holds a {type(leaf).__module__}.{type(leaf).__name__} of shape "
            f"{tuple(leaf.shape)}: a task batch is split by task along its tensors only, so "
            "every task would get all of it. Convert it with torch.as_tensor(...)."
        )
    return leaf


class _NonStrictLoadCures(ValueError):
    """A strict load's refusal that a non-strict load (``strict=False``) cures, as its
    message says: :func:`resume_strictly`, for the runs, which resume strictly, adds how to
    do that."""


def resume_strictly(
    load_checkpoint: Callable[[str | os.PathLike], None], path: str | os.PathLike, owner: str
) -> None:
    """``load_checkpoint(path)`` for a ``run()``, which resumes strictly: a refusal that
    ``strict=False`` cures says how to load the file anyway (``owner``: who loads it)."""
    try:
        load_checkpoint(path)
    except _NonStrictLoadCures as error:
        raise ValueError(
            f"{error} run() resumes strictly: to load {path} anyway, call "
            f"{owner}.load_checkpoint(path, strict=False) and then {owner}.save_checkpoint(path) "
            "once before run()."
        ) from error


def check_run_options(checkpoint_seconds: float | None, log: Any, **counts: Any) -> None:
    """Refuse a ``run()`` option out of range: ``counts`` (``checkpoint_every``, ...) must be
    integers >= 1, ``checkpoint_seconds`` ``None`` or a number > 0, ``log`` ``None`` or a
    callable (refused before the first step, not when the first record is due)."""
    if log is not None and not callable(log):
        raise TypeError(
            f"log must be None or a callable that takes each record (a dict), e.g. "
            f"records.append, got {type(log).__name__} {log!r:.60}."
        )
    for name, value in counts.items():
        check_count(value, name)
    if checkpoint_seconds is not None and (
        isinstance(checkpoint_seconds, bool)
        or not isinstance(checkpoint_seconds, int | float)
        or not checkpoint_seconds > 0
    ):
        raise ValueError(
            f"checkpoint_seconds must be None or a number > 0, got {checkpoint_seconds!r}."
        )


class Interrupted(SystemExit):
    """:meth:`BilevelProblem.run` stopped on SIGTERM (or because another process of the group
    was told to stop) after saving its checkpoint. Uncaught, the process exits with status
    ``128 + signal`` (143 for SIGTERM), as if the signal had terminated it.

    Attributes:
        signal: the signal's number.
        step: UL steps done (and saved, when a checkpoint path was given).
        checkpoint: the checkpoint written, or ``None``.
    """

    def __init__(self, signum: int, step: int, checkpoint: str | os.PathLike | None) -> None:
        super().__init__(128 + signum)
        self.signal = signum
        self.step = step
        self.checkpoint = checkpoint


class BilevelProblem:
    """A bilevel problem: an LL optimizer, a UL calculator and (optionally) a UL optimizer.

    The runner drives anything that gives a hypergradient through the method's
    ``task_gradients(ll, train, val)``: a calculator (which runs the LL recording exactly the
    trajectory it needs, then adds its hypergradient to ``.grad``), or a method that keeps LL
    state across UL steps. On construction it checks that the LL and the method were given
    the same models, objective and LL settings.

    Args:
        ll: the lower-level optimizer, e.g. :class:`bilevel.ll.GradientDescent`.
        ul: the upper-level calculator, e.g. :class:`bilevel.ul.Implicit`.
        ul_optimizer: a ``torch.optim`` optimizer over the UL parameters (needed by
            :meth:`step` and :meth:`run`).
        on_nonfinite: what :meth:`step` does when the LL loss, the solver or the
            hypergradient becomes NaN or inf (or a series diverges): ``"raise"`` an error that
            names the UL step and the method, or ``"skip"`` the UL step (counted in
            ``skipped_steps``; ``last_skipped`` holds the error that the latest skipped step
            would have raised). UL parameters never receive NaN.
        ul_scheduler: a ``torch.optim.lr_scheduler`` scheduler of ``ul_optimizer``, stepped
            after every UL step the optimizer takes (not after a skipped one) and saved in
            checkpoints, so that a resumed run continues its schedule.
        before_ul_step: a callable given the UL parameters once their ``.grad`` hold the
            hypergradient and before the UL optimizer steps, which may transform ``.grad`` in
            place (clipping: ``lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0)``); what it
            leaves is checked for NaN and inf as the hypergradient is. It works for every
            method, those that keep LL state across UL steps included, where a loop of
            :meth:`hypergradient` and ``ul_optimizer.step()`` would not do: that query
            leaves their state as it was, so the LL would never move. A hook registered on a
            UL parameter is no substitute: it sees the partial terms that some methods add up
            (Implicit's direct and implicit terms, Forward's per-step tangent terms). Methods
            that keep LL state move it after the UL optimizer's step: the hook sees
            ``ll_model`` as it was before the UL step.

    """

    #: under ``torch.distributed``, copy rank 0's models to every process when built (the
    #: processes then compute one problem together); ``False`` for a problem that each
    #: process runs on its own (the checkpoints of an online run)
    broadcasts = True

    def __init__(
        self,
        ll: GradientDescent,
        ul: Any,
        ul_optimizer: torch.optim.Optimizer | None = None,
        on_nonfinite: str = "raise",
        ul_scheduler: Any = None,
        before_ul_step: Callable[[list[torch.nn.Parameter]], Any] | None = None,
    ) -> None:
        if not callable(getattr(ul, "task_gradients", None)):
            raise TypeError(
                "ul must be a bilevel.ul method (a calculator such as Implicit, or a method with "
                f"task_gradients(ll, train, val)), got {type(ul).__name__}."
            )
        if not hasattr(ll, "run") or not hasattr(ll, "iters"):
            raise TypeError(f"ll must be a bilevel.ll optimizer, got {type(ll).__name__}.")
        ul.check_against(ll)
        if ul_optimizer is not None and not isinstance(ul_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"ul_optimizer must be a torch.optim.Optimizer, got {type(ul_optimizer).__name__}."
            )
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        if ul_optimizer is not None:
            _check_optimizer(ul_optimizer, ul, ll)
        _check_scheduler(ul_scheduler, ul_optimizer)
        if before_ul_step is not None and not callable(before_ul_step):
            raise TypeError(
                "before_ul_step must be a callable of the UL parameters (e.g. lambda ps: "
                f"torch.nn.utils.clip_grad_norm_(ps, 1.0)), got {type(before_ul_step).__name__}."
            )
        self.ll = ll
        self.ul = ul
        self.ul_optimizer = ul_optimizer
        self.ul_scheduler = ul_scheduler
        self.on_nonfinite = on_nonfinite
        self.before_ul_step = before_ul_step
        if self.broadcasts:
            distributed.broadcast_modules(ul.ul_model, ll.ll_model)
        self.settings = self._settings()
        self._built_settings = self._changeable()
        self.step_count = 0
        self.skipped_steps = 0
        self.last_skipped: FloatingPointError | None = None
        self.last_ll_loss: torch.Tensor | None = None
        self._signal: int | None = None  # a stop asked for by SIGTERM / SIGINT during run
        self._peer_stop = False  # a process of the group asked to stop (distributed)
        # the seed of the torch generator stream that a data iterable draws from (see
        # _batches), and a one-shot iterator this problem took batches from: (it, taken,
        # its stream's state)
        self._data_seed: int | None = None
        self._one_shot: tuple[Iterator[Batch], int, torch.Tensor] | None = None

    def _settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (taken at construction, so that LR
        schedulers that change the optimizer's groups later do not count)."""

        def plain(value: Any) -> Any:
            if isinstance(value, int | float | str | bool | type(None)):
                return value
            if isinstance(value, PerElement | PerStep):  # recorded as the value it marks
                return plain(value.value)
            if isinstance(value, tuple | list):
                return [plain(v) for v in value]
            if isinstance(value, torch.Tensor):
                return value.item() if value.numel() == 1 else f"tensor{list(value.shape)}"
            return type(value).__name__

        opt = self.ul_optimizer
        settings = getattr(self.ul, "settings", None)
        calculator = {k: plain(v) for k, v in (settings() if settings else {}).items()}
        # the LL rule's other hyperparameters (momentum, betas, ...) and BDA's aggregation,
        # each only where it differs from its default: checkpoints written before they were
        # recorded hold the defaults, and still resume
        ll_settings = getattr(self.ll, "settings", None)
        ll_extra = {f"ll_{k}": plain(v) for k, v in (ll_settings() if ll_settings else {}).items()}
        return {
            "ul": self.ul.name,
            "ul_calculator": calculator,
            "ul_parameters": {
                n: list(p.shape) for n, p in self.ul.ul_model.named_parameters() if p.requires_grad
            },
            "ll_iters": self.ll.iters,
            "ll_optimizer": self.ll.optimizer,
            "ll_lr": plain(self.ll.lr),
            "ul_optimizer": None
            if opt is None
            else [type(opt).__name__]
            + [{k: plain(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
            # only with one (checkpoints written without a scheduler resume as before)
            **(
                {}
                if self.ul_scheduler is None
                else {"ul_scheduler": type(self.ul_scheduler).__name__}
            ),
            **ll_extra,
        }

    @property
    def ul_params(self) -> list[torch.nn.Parameter]:
        """The UL parameters that receive hypergradients."""
        return self.ul.ul_params

    def _accumulate(self, tasks: Sequence[tuple[Pair, Pair]]) -> torch.Tensor:
        """Set ``.grad`` of the UL parameters (which must be ``None``) to the task-averaged
        hypergradient; return the mean UL loss. Under ``torch.distributed`` each process
        takes its share of the tasks and the shares are summed.

        Under ``torch.distributed`` every process enters the one ``all_reduce`` even when its
        share failed: a flag per process (a non-finite value or a diverging LL; any other
        error) travels in the same buffer, so all processes learn of a failure at once and
        raise together (a ``FloatingPointError`` where only such faults occurred, which
        ``on_nonfinite="skip"`` skips on every process; :class:`bilevel.distributed.PeerError`
        otherwise). No process is left waiting in a collective, and no collective is added.
        """
        if not tasks:
            raise ValueError("no task to compute a hypergradient on.")
        # every method, also those whose own steps do not pass through accumulate
        check_ul_parameters(self.ul)
        # as when built, where one level was replaced or a setting of either changed
        self.ul.check_against_once(self.ll)
        self._check_single_state(len(tasks))
        group = distributed.active()
        # without a process group every task is this process's, each weighing 1 / len(tasks)
        mine, weight = self._share(tasks) if group else (dict(enumerate(tasks)), 1.0 / len(tasks))
        # a method that draws its own randomness (StochasticImplicit) passes over the other
        # processes' tasks, and over those after a fault, so that every task gets the draws
        # one process would give it and every process, and one alone, ends a step (a skipped
        # one too) with the same generator state
        skip = getattr(self.ul, "skip_task", None) if len(tasks) > 1 else None
        losses, fault = self._run_tasks(tasks, mine, skip, group)
        if weight == 0.0:  # a copy of rank 0's work (see _share): rank 0's result is kept
            losses = []
            for p in self.ul_params:
                p.grad = None
        reference = self.ul_params[0]  # no task on this process: zeros
        dtype = reference.dtype.to_real()  # losses are real, also for complex models
        if not group and len(losses) == 2:  # one task in one process: the sums are its own
            for p in self.ul_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.last_ll_loss = _scalar(losses[1], dtype)
            return _scalar(losses[0], dtype)
        if fault is None and losses:
            totals = torch.stack(losses).view(-1, 2).sum(0).to(dtype)
        else:
            totals = reference.new_zeros(2, dtype=dtype)
        grads = [
            torch.zeros_like(p) if p.grad is None or fault is not None else p.grad
            for p in self.ul_params
        ]
        if weight != 1.0:
            for t in (*grads, totals):
                t.mul_(weight)
        if group:
            grads, totals = self._reduce(grads, totals, fault)
        for p, g in zip(self.ul_params, grads, strict=True):
            p.grad = g
        ul_loss, ll_loss = totals.unbind()
        self.last_ll_loss = ll_loss
        return ul_loss

    def _run_tasks(
        self,
        tasks: Sequence[tuple[Pair, Pair]],
        mine: dict[int, Any],
        skip: Callable[..., None] | None,
        group: bool,
    ) -> tuple[list[torch.Tensor], Exception | None]:
        """Run this process's tasks (``mine``, by index), adding their hypergradients to
        ``.grad``: ``([ul_loss, ll_loss] per task, the fault or None)``. ``skip`` (a method's
        own draws) passes over the other processes' tasks and over those after a fault, so
        that the draws are those of every task in order, with or without a process group.
        Without a process group a fault is raised once the tasks are passed over (at once
        where nothing draws); with one it is returned, to be raised after the all-reduce,
        with every other process."""
        losses: list[torch.Tensor] = []
        fault: Exception | None = None
        for i in range(len(tasks)) if skip is not None else mine:
            try:
                if i not in mine or fault is not None:
                    if skip is not None:
                        skip(*tasks[i])
                    continue
                kept = self.ul.state_dict() if skip is not None else None
                try:
                    losses.extend(self.ul.task_gradients(self.ll, *mine[i]))
                except Exception:
                    if kept is not None:  # the task's draws as if it had run to its end
                        self.ul.load_state_dict(kept)
                        skip(*tasks[i])
                    raise
            except Exception as error:
                if not group and skip is None:
                    raise
                fault = error
        if fault is not None and not group:
            raise fault
        return losses, fault

    def _reduce(
        self, grads: list[torch.Tensor], totals: torch.Tensor, fault: Exception | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sum the weighted hypergradients and losses over the processes, in one all-reduce
        that also carries each process's fault flags and stop request, and rank 0's buffers
        (batch-norm running statistics, which the UL objective moves on each process with
        its own share: the others add zeros). Raises on every process if any failed."""
        reference = self.ul_params[0]
        dtype = reference.dtype.to_real()  # (the flags and buffers are real)
        world, rank = distributed.world_size(), distributed.rank()
        flags = reference.new_zeros(2 * world + 1, dtype=dtype)  # [numeric fault | other | stop]
        if fault is not None:
            flags[rank + (0 if isinstance(fault, FloatingPointError) else world)] = 1
        flags[-1] = float(self._signal is not None)
        buffers = [b for b in self._all_buffers() if not b.is_complex()]
        sent = [
            b.detach().to(dtype) if rank == 0 else reference.new_zeros(b.shape, dtype=dtype)
            for b in buffers
        ]
        reduced = distributed.all_reduce_sum([*grads, totals, flags, *sent])
        grads, (totals, flags) = reduced[: len(grads)], reduced[len(grads) : len(grads) + 2]
        with torch.no_grad():
            for b, value in zip(buffers, reduced[len(grads) + 2 :], strict=True):
                b.copy_(value if b.is_floating_point() else value.round())
        self._raise_for_faults(flags.tolist(), world, fault)
        return grads, totals

    def _share(self, tasks: Sequence[tuple[Pair, Pair]]) -> tuple[dict[int, Any], float]:
        """Under ``torch.distributed``: the tasks this process runs (by their index in
        ``tasks``) and the weight of each. Several tasks: round-robin, ``1 / len(tasks)`` each.
        One task: its UL batch split by examples, each share weighing its fraction of them,
        where the method's hypergradient is linear in the UL objective (``splits_ul_batch``)
        and the LL does not read the UL batch (BDA with ``alpha > 0`` does); otherwise (PTT's
        choice of step, CG's Krylov space, a UL batch that cannot be split) every process runs
        the whole task, so that their states stay equal, and rank 0's result is kept (weight
        0 elsewhere)."""
        rank, world = distributed.rank(), distributed.world_size()
        if len(tasks) > 1:
            return {i: tasks[i] for i in range(rank, len(tasks), world)}, 1.0 / len(tasks)
        (train, val) = tasks[0]
        splits = getattr(self.ul, "splits_ul_batch", False) and not getattr(
            self.ll, "reads_ul_batch", False
        )
        share = distributed.share_of_examples(val, rank, world) if splits else None
        if share is None:
            return {0: tasks[0]}, 1.0 if rank == 0 else 0.0
        return {0: (train, share[0])}, share[1]

    def _raise_for_faults(self, flags: list[float], world: int, fault: Exception | None) -> None:
        """After the all-reduce: raise on every process if any process failed."""
        self._peer_stop = flags[-1] > 0
        numeric = [r for r in range(world) if flags[r] > 0]
        errors = [r for r in range(world) if flags[world + r] > 0]
        if errors:
            if fault is not None and not isinstance(fault, FloatingPointError):
                raise fault
            raise distributed.PeerError(
                f"process(es) of rank {errors} raised an error in this UL step (see their "
                "tracebacks); this process stops with them, so that none waits for the others "
                "in a collective."
            ) from fault
        if numeric:
            if fault is not None:
                raise fault
            raise FloatingPointError(
                f"process(es) of rank {numeric} met a non-finite value or a diverging LL in "
                "their share of this UL step (their messages say which); every process skips "
                "or raises with them."
            )

    def _check_single_state(self, n_tasks: int) -> None:
        """Refuse what would move a method's one LL state several times in one UL step."""
        if not getattr(self.ul, "keeps_ll_state", False):
            return
        name = type(self.ul).__name__
        if n_tasks > 1:
            raise ValueError(
                f"{name} keeps one LL state across UL steps, and a batch of {n_tasks} tasks would "
                "move it once per task: give it one task per step (step(train, val)), or use a "
                "method that starts the LL afresh for each task (Reverse, Implicit, ...)."
            )
        if distributed.active():
            raise ValueError(
                f"{name} keeps one LL state across UL steps, which each process would move on "
                "its own under torch.distributed: run it in one process."
            )

    def _hypergradient(self, tasks: Sequence[tuple[Pair, Pair]]) -> list[torch.Tensor]:
        saved = [p.grad for p in self.ul_params]
        for p in self.ul_params:
            p.grad = None
        kept = self._method_state()
        # a query: the models' buffers (batch-norm running statistics) as they were
        buffers = [(b, b.detach().clone()) for b in self._all_buffers()]
        last_ll_loss = self.last_ll_loss
        # the method's changes are dropped (and kept apart from those of a step under way,
        # when the query comes from before_ul_step)
        _, outer = self.ul.hold_state_changes()
        try:
            with kept_buffers(buffers):
                self._accumulate(tasks)
            grads = [
                torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for p in self.ul_params
            ]
            try:  # a query refuses what a step would
                check_hypergradient(grads)
            except FloatingPointError as error:
                raise _located(error, self.ul.name) from None
        except BaseException as error:
            self._put_back(saved, kept, error)
            raise
        finally:
            self.ul.stop_holding_state_changes(outer)
            self.last_ll_loss = last_ll_loss
        self._put_back(saved, kept, None)
        return grads

    def _all_buffers(self) -> list[torch.Tensor]:
        """Every buffer of the UL and LL models (each once; without ``buffers()``'s chain of
        generators, most of the cost of the UL step's record of them for small models)."""
        seen: dict[int, torch.Tensor] = {}
        for model in (self.ul.ul_model, self.ll.ll_model):
            for module in module_list(model):
                for b in module._buffers.values():
                    if b is not None:
                        seen.setdefault(id(b), b)
        return list(seen.values())

    def _put_back(
        self, grads: list[torch.Tensor | None], kept: tuple[dict, dict] | None, error: Any
    ) -> None:
        """After :meth:`hypergradient`: the UL parameters' ``.grad`` and the method's state as
        they were. When the hypergradient itself failed (``error``), a failure to restore the
        state is noted on that error rather than raised in its place."""
        for p, old in zip(self.ul_params, grads, strict=True):
            p.grad = old
        try:
            self._restore_method_state(kept)
        except Exception as restore_error:
            if error is None:
                raise
            error.add_note(f"(The method's state could not be put back: {restore_error})")

    def _method_state(self) -> tuple[dict, dict] | None:
        """A copy of what a stateful method keeps across UL steps (its state and the LL
        model's weights, which such methods move), so that :meth:`hypergradient` can leave
        them as they were; ``None`` for methods that keep nothing, or whose state a query
        advances (``queries_keep_state``: a generator's draws)."""
        if not hasattr(self.ul, "state_dict") or not self.ul.queries_keep_state:
            return None
        method = copy.deepcopy(self.ul.state_dict())
        ll_model = copy.deepcopy(self.ll.ll_model.state_dict())
        return method, ll_model

    def _restore_method_state(self, kept: tuple[dict, dict] | None) -> None:
        if kept is not None:
            self.ul.load_state_dict(kept[0])
            self.ll.ll_model.load_state_dict(kept[1])

    def _one_task(self, train: Pair, val: Pair) -> list[tuple[Pair, Pair]]:
        """Check the arguments of one task (before any LL step): pairs, dtypes and devices."""
        check_pair(train, "train")
        check_pair(val, "val")
        self._check_data({"train": train, "val": val})
        return [(train, val)]

    def _tasks(self, batch: dict[str, Pair]) -> list[tuple[Pair, Pair]]:
        tasks = split_tasks(batch)
        self._check_data({'batch["train"]': batch["train"], 'batch["test"]': batch["test"]})
        return tasks

    def _check_data(self, pairs: dict[str, Pair]) -> None:
        """Refuse data on another device, or floating-point data of another dtype than the
        models', also inside nested data (checked here, before the LL runs, rather than met
        as a raw error, or a silent promotion, inside an objective)."""
        reference = self.ul.ul_params[0]
        check_precision(reference.dtype, "ul_model (converted since the problem was built)")
        for name, pair in pairs.items():
            for i, member in enumerate(pair):
                check_data_matches(member, reference, name, i)
                if not isinstance(member, torch.Tensor) or not (
                    member.ndim == 0 or member.shape[0]
                ):
                    _refuse_empty(member, f"{name}[{i}]")  # (a tensor with rows: no call)

    def hypergradient(self, train: Pair, val: Pair) -> list[torch.Tensor]:
        """The hypergradient for one task, one tensor per entry of :attr:`ul_params` (the UL
        parameters that require grad; a frozen one has none).

        UL parameters and their ``.grad`` are left unchanged, and so is the state of a method
        that keeps one across UL steps (SOBA, DM, ...). Random draws in the objectives
        (dropout, noise) come from the global RNG as in :meth:`step`: from the same RNG state
        this is the hypergradient ``step`` takes, and each call draws anew (wrap it in
        ``torch.random.fork_rng()`` to leave the global RNG as it was); so do
        ``StochasticImplicit``'s minibatches, from its own generator. A method that scales
        its direction by a step-size schedule returns it scaled, as ``step`` takes it
        (``SOBA``: times ``diagnostics["ul_scale"]``, ``(t + 1) ** -ul_decay``).

        Args:
            train: ``(data, target)`` for the LL.
            val: ``(data, target)`` for the UL.
        """
        return self._hypergradient(self._one_task(train, val))

    def meta_hypergradient(self, batch: dict[str, Pair]) -> list[torch.Tensor]:
        """The hypergradient averaged over a task batch ``{"train": .., "test": ..}``."""
        return self._hypergradient(self._tasks(batch))

    def _step(self, tasks: Sequence[tuple[Pair, Pair]]) -> torch.Tensor:
        if self.ul_optimizer is None:
            raise ValueError("step needs a ul_optimizer: BilevelProblem(ll, ul, ul_optimizer).")
        start = _StepStart(self)
        commits, outer = self.ul.hold_state_changes()  # the method's changes, until the UL step
        try:
            try:
                loss = self._direction(tasks)
            except FloatingPointError as error:
                return self._refuse_or_skip(error, start)
            self._take_ul_step()
        except BaseException as error:
            start.put_back(error)
            raise
        finally:
            self.ul.stop_holding_state_changes(outer)
        for commit in commits:  # the method's state moves with the UL variables
            commit()
        self.step_count += 1
        return loss

    def _direction(self, tasks: Sequence[tuple[Pair, Pair]]) -> torch.Tensor:
        """Set ``.grad`` of the UL parameters to the direction of the UL step: the
        hypergradient, checked, as ``before_ul_step`` leaves it; return the UL loss."""
        self.ul_optimizer.zero_grad(set_to_none=True)
        loss = self._accumulate(tasks)
        check_hypergradient([p.grad for p in self.ul.ul_params])
        if self.before_ul_step is not None:
            self.before_ul_step(self.ul_params)
            left = [p.grad for p in self.ul_params if p.grad is not None]
            if left and not all_finite(left):
                raise FloatingPointError(
                    "the gradient that before_ul_step left is not finite (NaN or inf)."
                )
        return loss

    def _refuse_or_skip(self, error: FloatingPointError, start: _StepStart) -> torch.Tensor:
        """A failed LL run (NaN, inf, or a loss that grew), a diverged solver or a non-finite
        hypergradient: raise it, located, or (``on_nonfinite="skip"``) count the UL step as
        skipped, without touching the UL parameters, the method's state or the models'
        buffers (a NaN batch would leave its NaN in batch-norm statistics for good); the
        method's own draws and torch's generators stay drawn, so that the next step draws
        anew."""
        located = _located(error, f"UL step {self.step_count} ({self.ul.name})")
        if self.on_nonfinite == "raise":
            raise located from error
        put_back_buffers(start.buffers)
        self.ul_optimizer.zero_grad(set_to_none=True)
        self.last_skipped = located
        self.skipped_steps += 1
        self.step_count += 1
        # NaN where a step's UL and LL losses would be: the models' real dtype, on their device
        # (the LL loss not the previous step's, beside this step's diagnostics)
        reference = self.ul_params[0]
        nan = reference.new_full((), float("nan"), dtype=reference.dtype.to_real())
        self.last_ll_loss = nan
        return nan

    def _take_ul_step(self) -> None:
        """Step the UL optimizer and scheduler. An error in them after they changed a UL
        parameter or the optimizer's state says so: that change cannot be put back."""
        versions = _versions(self.ul_optimizer)
        try:
            self.ul_optimizer.step()
            if self.ul_scheduler is not None:
                self.ul_scheduler.step()
        except BaseException as error:
            if _versions(self.ul_optimizer) != versions:
                error.add_note(
                    "(The UL optimizer or its scheduler raised after it had changed UL "
                    "parameters or its state: that part of the UL step cannot be put back. "
                    "Load the last checkpoint before taking more steps.)"
                )
            raise

    def step(self, train: Pair, val: Pair) -> torch.Tensor:
        """Zero the UL grads, compute the hypergradient, step the UL optimizer.

        A failed UL step (NaN or inf anywhere, an LL whose loss grew over its run, a diverged
        linear solve) leaves the UL parameters bitwise unchanged: it raises (the error's type
        is kept, its message starts with the UL step and the method) or, under
        ``on_nonfinite="skip"``, is skipped and counted in ``skipped_steps``.

        A step that raises, whatever the error (an objective's, ``KeyboardInterrupt``, a
        refusal), changes nothing: ``.grad`` of the UL parameters, the LL model, the method's
        state across UL steps (its draws included), its diagnostics, the models' buffers and
        torch's generators (CPU, and the first UL parameter's CUDA device) are as before, so
        that catching the error and stepping again gives the step an uninterrupted run takes.
        Only an error inside the UL optimizer's own step, after it changed a UL parameter,
        cannot be undone: the error then says so (load the last checkpoint).

        Returns:
            The UL loss before the step (detached); NaN for a skipped step.
        """
        return self._step(self._one_task(train, val))

    def _changeable(self) -> dict[str, dict[str, Any]]:
        """The settings of the method and of the LL optimizer that may be set after
        construction (:func:`bilevel.settings.current`), as they are now."""
        return {"ul": current(self.ul), "ll": current(self.ll)}

    def _changed_settings(self) -> dict[str, Any]:
        """What changed since construction among :meth:`_changeable`: the plain values by
        level, which a checkpoint holds and a load sets again, and the names of the others
        (a callable, a tensor), which a file cannot hold (``kept_out``)."""
        changed: dict[str, Any] = {"ul": {}, "ll": {}, "kept_out": []}
        for level, values in self._changeable().items():
            built = self._built_settings[level]
            for name, value in values.items():
                if not _same_setting(value, built.get(name, _ABSENT)):
                    if _plain_setting(value):
                        changed[level][name] = value
                    else:
                        changed["kept_out"].append(f"{level}.{name}")
        return changed

    def _restore_settings(self, changed: Any, strict: bool) -> None:
        """Set again the settings that the checkpoint's run changed after construction, each
        checked as any assignment is (those constrained by each other, in whichever order
        they pass); with ``strict``, one this problem does not have is refused."""
        if changed is None:  # (written before these were recorded)
            return
        levels = {"ul": self.ul, "ll": self.ll}
        kept_out = changed.get("kept_out", []) if isinstance(changed, dict) else None
        if not (
            isinstance(kept_out, list)  # (None: changed is not a dict)
            and all(isinstance(name, str) for name in kept_out)
            and all(isinstance(changed.get(level, {}), dict) for level in levels)
        ):
            raise ValueError(
                "the checkpoint's 'changed_settings' is damaged (not a dict of the settings "
                "changed per level, with the names in 'kept_out'). Restore the file from a "
                "copy, or start a new run."
            )
        live = self._changeable()
        pending = []
        for level, obj in levels.items():
            for name, value in changed.get(level, {}).items():
                if name not in live[level]:
                    if strict:
                        raise ValueError(
                            f"the checkpoint's run changed {level}.{name}, which this "
                            f"problem's {type(obj).__name__} does not have: it is of another "
                            "run. Resume with the same method and LL optimizer, or start a new "
                            "run with another checkpoint path (or delete it)."
                        )
                elif not _same_setting(live[level][name], value):
                    pending.append((level, obj, name, value))
        while pending:  # a pass that sets none of them ends it
            refused = []
            for level, obj, name, value in pending:
                try:
                    setattr(obj, name, value)
                except Exception as error:  # (any refusal: float(10**400) overflows)
                    refused.append(((level, obj, name, value), error))
            if len(refused) == len(pending):
                (level, _, name, value), error = refused[0]
                raise ValueError(
                    f"the checkpoint's run set {level}.{name} = {value!r} after construction, "
                    f"which this problem refuses: {error} The file is damaged or of another "
                    "run: restore it from a copy, or start a new run."
                ) from error
            pending = [item for item, _ in refused]

    def _put_settings_back(self, kept: dict[str, dict[str, Any]]) -> None:
        """Put back the settings :meth:`_changeable` returned, as they were (a load that
        failed part-way), without checks: they were the problem's own."""
        for level, obj in (("ul", self.ul), ("ll", self.ll)):
            for name, value in kept[level].items():
                obj.__dict__[f"_{name}"] = value
            count_change(obj)  # (the runner checks the levels again at its next step)

    def meta_step(self, batch: dict[str, Pair]) -> torch.Tensor:
        """:meth:`step` on a task batch, with the hypergradient averaged over tasks."""
        return self._step(self._tasks(batch))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: UL model, UL optimizer, LL model, step counters, RNG
        states and settings, as tensors and plain values (a weights-only load accepts it).

        Raises:
            ValueError: a setting was changed to one that the method refuses against the LL
                optimizer (as at construction): a state holding it could not be resumed
                (one set from ``run``'s ``log`` was written into the checkpoint, and every
                resume refused). Set it back first.
        """
        self.ul.check_against_once(self.ll)
        return self._state()

    def _state(self) -> dict[str, Any]:
        """:meth:`state_dict`, unchecked (what a load puts back if it fails)."""
        optimizer = None
        if self.ul_optimizer is not None:
            optimizer = self.ul_optimizer.state_dict()
            # hyperparameters as Python values: a NumPy learning rate would make the file
            # unloadable without running code
            optimizer["param_groups"] = ckpt.plain(optimizer["param_groups"])
        return {
            "ul_model": self.ul.ul_model.state_dict(),
            "ll_model": self.ll.ll_model.state_dict(),
            "ul_optimizer": optimizer,
            "ul_scheduler": None
            if self.ul_scheduler is None
            else ckpt.plain(self.ul_scheduler.state_dict()),
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "rng": ckpt.rng_state(),
            "settings": ckpt.plain(self.settings),
            # the settings changed since construction, set again on load
            "changed_settings": ckpt.plain(self._changed_settings()),
            # what a method keeps across UL steps (LL or auxiliary variables), if anything
            "method": self.ul.state_dict() if hasattr(self.ul, "state_dict") else None,
            "data_seed": self._data_seed,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` saved.

        Raises:
            ValueError: with ``strict``, the state was saved by a problem with other settings
                (method and its settings, LL steps, learning rate and the update rule's other
                hyperparameters, BDA's aggregation, UL optimizer and its hyperparameters, UL
                parameter shapes): resuming it would silently mix two runs. A setting that
                only one side records is at its default on the other. Also with ``strict``:
                the state lacks the UL optimizer's state or the method's state that this
                problem carries across UL steps, records no settings, or holds UL or LL
                model entries of other names, shapes or dtypes (a float32 state would be
                cast into a float64 model silently). With or without ``strict``: a step
                count that is not an int >= 0, or a setting changed by the saved run that
                this problem refuses (with ``strict``, also one it does not have).

        The settings that the saved run changed after construction (``ll.iters = 50``
        mid-run) are set again, checked as any assignment is; a setting it did not change
        keeps its value here. One the file could not hold (a callable) is named in a
        ``RuntimeWarning``: set it again after loading.

        Nothing is changed unless everything is restored: a state that does not fit is
        refused before any change, and a failure part-way (a damaged RNG state, a method's
        state that does not fit) puts the models, the UL optimizer, the method's state, the
        step counters and the RNG states back as they were before raising.
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                "state must be the dict of state_dict() or bilevel.checkpoint.load(path), got "
                f"{type(state).__name__}."
            )
        missing = [key for key in ("ul_model", "ll_model") if key not in state]
        if missing:  # (also without strict: the models are what any load restores)
            raise ValueError(
                f"the state has no {' or '.join(map(repr, missing))}: it was not written by "
                "BilevelProblem.state_dict. Resume from a checkpoint written by this problem's "
                "save_checkpoint."
            )
        saved = state.get("settings")
        current = ckpt.plain(self.settings)
        if strict and saved is None:
            raise _NonStrictLoadCures(
                "the checkpoint records no settings (it was not written by "
                "BilevelProblem.state_dict), so it cannot be checked against this problem. "
                "Resume from a checkpoint written by this problem's save_checkpoint, or pass "
                "strict=False to load it anyway."
            )
        if strict and saved != current:
            saved_flat, current_flat = _flat(saved), _flat(current)
            changed = sorted(
                k
                for k in {*saved_flat, *current_flat}
                if saved_flat.get(k, _ABSENT) != current_flat.get(k, _ABSENT)
            )
            details = "; ".join(
                f"{k}: {_recorded(saved_flat, k)} -> {_recorded(current_flat, k)}" for k in changed
            )
            raise ValueError(
                f"the checkpoint was written with other settings ({details}). Resume with the "
                "same settings, or start a new run with another checkpoint path (or delete it)."
            )
        if strict:
            self._check_state_parts(state)
            differences = [
                *_module_differences("ul_model", state.get("ul_model"), self.ul.ul_model),
                *_module_differences("ll_model", state.get("ll_model"), self.ll.ll_model),
            ]
            if differences:
                # strict=False loads entries of other dtypes (cast); torch's own
                # load_state_dict refuses missing, extra or reshaped ones whatever it says
                castable = all(kind == "dtype" for _, kind in differences)
                raise (_NonStrictLoadCures if castable else ValueError)(
                    "the checkpoint is of another problem "
                    f"({'; '.join(text for text, _ in differences)}). Resume with the same "
                    "models, or start a new run with another checkpoint path (or delete it)"
                    + (
                        "; pass strict=False to load it anyway (its entries are cast)."
                        if castable
                        else "."
                    )
                )
        for key in ("step", "skipped_steps"):
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"the checkpoint's {key!r} is {value!r}, not an int >= 0: the file is "
                    "damaged or was not written by BilevelProblem.state_dict. Restore it from a "
                    "copy, or start a new run."
                )
        before = copy.deepcopy(self._state())  # what _load changes, to put it back
        settings = self._changeable()
        try:
            self._load(state, strict)
        except BaseException as error:
            self._put_settings_back(settings)
            self._load(before)
            error.add_note("(The problem was left as it was before the load.)")
            raise
        kept_out = (state.get("changed_settings") or {}).get("kept_out") or []
        if kept_out:
            warn_user(
                f"the checkpoint's run changed {', '.join(kept_out)} after "
                "construction to a value a file cannot hold (a callable, a tensor): set it "
                "again after loading, or the run continues with the value this problem has.",
                RuntimeWarning,
            )

    def _load(self, state: dict[str, Any], strict: bool = True) -> None:
        self.ul.ul_model.load_state_dict(state["ul_model"])
        self.ll.ll_model.load_state_dict(state["ll_model"])
        if self.ul_optimizer is not None and state.get("ul_optimizer") is not None:
            self.ul_optimizer.load_state_dict(state["ul_optimizer"])
        if self.ul_scheduler is not None and state.get("ul_scheduler") is not None:
            self.ul_scheduler.load_state_dict(state["ul_scheduler"])
        self.step_count = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("method") is not None:
            self.ul.load_state_dict(state["method"])
        ckpt.set_rng_state(state["rng"])
        self._data_seed = state.get("data_seed")  # (None in checkpoints written before it)
        self._restore_settings(state.get("changed_settings"), strict)

    def _check_state_parts(self, state: dict[str, Any]) -> None:
        """Refuse a state that lacks what this problem carries across UL steps (the UL
        optimizer's moments, the method's LL or auxiliary variables): loading it would
        restart them silently, and the resumed run would not be the uninterrupted one."""
        missing = []
        if self.ul_optimizer is not None and state.get("ul_optimizer") is None:
            missing.append(f"the UL optimizer's state ({type(self.ul_optimizer).__name__})")
        if self.ul_scheduler is not None and state.get("ul_scheduler") is None:
            missing.append(f"the UL scheduler's state ({type(self.ul_scheduler).__name__})")
        if hasattr(self.ul, "state_dict") and state.get("method") is None:
            missing.append(f"the state of {type(self.ul).__name__} (its variables across UL steps)")
        if missing:
            raise _NonStrictLoadCures(
                f"the checkpoint holds no {' and no '.join(missing)}, which this problem "
                "carries across UL steps: resuming would restart them, not continue the run. "
                "Resume from a checkpoint written by this problem's save_checkpoint, or pass "
                "strict=False to start them afresh on purpose."
            )

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (:func:`bilevel.checkpoint.save`)."""
        ckpt.save(path, self.state_dict())

    def load_checkpoint(self, path: str | os.PathLike, strict: bool = True) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (see
        :meth:`load_state_dict` for ``strict``).

        The file is read without running code from it (:func:`bilevel.checkpoint.load`).

        Raises:
            bilevel.checkpoint.CheckpointError: the file is missing, damaged, unsafe (a file
                crafted to run code, or a checkpoint of an older bilevel) or not a checkpoint
                of a :class:`BilevelProblem`; the message names it and says what to do.
        """
        required = ("ul_model", "ll_model", "step", "rng")
        self.load_state_dict(ckpt.load(path, require=required), strict=strict)

    def _batches(self, data: Iterable[Batch], start: int, steps: int) -> Iterator[Batch]:
        """The batches of UL steps ``start`` to ``steps`` of an iterable ``data``, drawn from a
        torch generator stream of their own: a ``DataLoader(shuffle=True)`` draws its order
        (each epoch's) and its workers' seeds from torch's global generator when iterated,
        and a dataset's random transforms at each batch. Here those draws come from a stream
        seeded at the run's first step (from the global generator's state, which this does
        not advance; the seed is kept in checkpoints), swapped in for each batch: a resumed
        run iterates ``data`` again from the seed and skips the steps taken, and gets the
        uninterrupted run's batches, while the steps draw from the global generator as
        restored (before, a resume drew another order from the checkpoint's state, or, with
        the draws interleaved with the steps', another order at each epoch after the first).
        A one-shot iterator (``iter(data) is data``: a generator, ``itertools.cycle``)
        passed again goes on from the batches this problem took from it."""
        if start == 0 or self._data_seed is None:
            self._data_seed = _seed_of(torch.get_rng_state())
        kept = self._one_shot
        if kept is not None and kept[0] is data:
            iterator, taken, state = kept
            if taken > start:
                raise ValueError(
                    f"data is an iterator that this problem already took {taken} batches from, "
                    f"and the run resumes at UL step {start}: it cannot go back. Pass data that "
                    "can be iterated again (a DataLoader, a list), or a new iterator."
                )
        else:
            iterator, taken = None, 0
            state = torch.Generator().manual_seed(self._data_seed).get_state()

        def drawn(call: Callable[[], Any]) -> Any:
            nonlocal state
            outer = torch.get_rng_state()
            torch.set_rng_state(state)
            try:
                return call()
            finally:
                state = torch.get_rng_state()
                torch.set_rng_state(outer)

        if iterator is None:
            iterator = drawn(lambda: iter(data))
        end = object()
        for step in range(taken, steps):
            batch = drawn(lambda: next(iterator, end))
            if batch is end:
                return  # (one that runs out: see _run)
            if iterator is data:
                self._one_shot = (iterator, step + 1, state)
            if step >= start:
                yield batch

    def log_record(self, loss: torch.Tensor) -> dict[str, Any]:
        """What the runner logs after a step: step, losses and the calculator's diagnostics."""
        record: dict[str, Any] = {"step": self.step_count, "method": self.ul.name}
        values = {"ul_loss": loss, "ll_loss": self.last_ll_loss}
        for key, value in self.ul.diagnostics.items():
            if key != "ul_loss":
                values[key] = value
        for key, value in values.items():
            record[key] = float(value) if isinstance(value, torch.Tensor) else value
        record["skipped_steps"] = self.skipped_steps
        return record

    def run(
        self,
        data: Callable[[int], Batch] | Iterable[Batch],
        steps: int,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        log: Callable[[dict[str, Any]], None] | None = None,
        log_every: int = 10,
        progress: bool = True,
        checkpoint_seconds: float | None = None,
    ) -> dict[str, Any] | None:
        """Run UL steps until ``steps`` have been taken, resuming from ``checkpoint`` if it
        exists.

        With a ``checkpoint``, SIGTERM (what schedulers send before preemption) and SIGINT
        (Ctrl-C) stop the run cleanly: the UL step under way is finished, the checkpoint is
        saved, and ``run`` raises :class:`Interrupted` (a ``SystemExit``: uncaught, the
        process exits with status 143 for SIGTERM) or ``KeyboardInterrupt`` (SIGINT); a second
        signal stops at once. Starting the same command again resumes where it stopped.
        Under ``torch.distributed`` a signal to any process stops every process after the
        same UL step. The handlers are installed for the duration of ``run`` only (and only
        from the main thread); the previous ones are restored afterwards.

        Args:
            data: a function ``step -> batch`` (resumes exactly), or an iterable of batches,
                whose draws from torch's generator come from a stream of their own (on
                resume, it is iterated again from the stream's seed, which checkpoints keep,
                and the batches of the steps already taken are skipped: a
                ``DataLoader(shuffle=True)`` gives the same batches, epoch after epoch). A
                batch is ``(train, val)`` with ``(data, target)`` pairs, or a task batch
                ``{"train": (x, y), "test": (x, y)}``. An iterable must yield at least
                ``steps`` batches: one with a length shorter than that is refused before the
                first step, and one that runs out raises (after saving the checkpoint).
            steps: total number of UL steps.
            checkpoint: file to resume from and save to (atomically), or ``None``.
            checkpoint_every: UL steps between checkpoints (and one at the end).
            log: called with a dict (step, UL and LL loss, solver diagnostics) every
                ``log_every`` steps. Under ``torch.distributed``, only rank 0 logs, shows the
                progress bar and writes the checkpoint; every rank resumes from it.
            log_every: UL steps between log records.
            progress: show a tqdm progress bar.
            checkpoint_seconds: also save when this many seconds have passed since the last
                save (checked after each UL step), so that a kill loses at most about that
                much work; ``None``: by steps only.

        Returns:
            The last log record, or ``None`` if no step was run.

        Raises:
            Interrupted: SIGTERM arrived (the checkpoint was saved first).
            KeyboardInterrupt: SIGINT arrived (the checkpoint was saved first).
            ValueError: ``data`` holds or yields fewer than ``steps`` batches; the run (or
                ``checkpoint``) is already past UL step ``steps``.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}.")
        check_run_options(
            checkpoint_seconds, log, checkpoint_every=checkpoint_every, log_every=log_every
        )
        if not callable(data):
            if not isinstance(data, Iterable):
                raise TypeError(
                    "data must be a function step -> batch or an iterable of batches, got "
                    f"{type(data).__name__}."
                )
            length = _length(data)
            if length is not None and length < steps:
                raise ValueError(
                    f"data holds {length} batches but steps={steps}: the run would stop early. "
                    "Give at least steps batches (a function step -> batch, or e.g. "
                    "itertools.cycle(loader) for several epochs), or lower steps."
                )
        with self._signals(checkpoint is not None):
            return self._run(
                data,
                steps,
                checkpoint,
                checkpoint_every,
                log,
                log_every,
                progress,
                checkpoint_seconds,
            )

    def _run(
        self,
        data: Callable[[int], Batch] | Iterable[Batch],
        steps: int,
        checkpoint: str | os.PathLike | None,
        checkpoint_every: int,
        log: Callable[[dict[str, Any]], None] | None,
        log_every: int,
        progress: bool,
        checkpoint_seconds: float | None,
    ) -> dict[str, Any] | None:
        if checkpoint is not None and Path(checkpoint).exists():
            resume_strictly(self.load_checkpoint, checkpoint, "problem")
        if checkpoint is not None and distributed.is_main_process():
            ckpt.check_writable(checkpoint)  # (not at the first save, after its steps)
        start = self.step_count
        if start > steps:  # (a loaded checkpoint stays loaded, as OnlineHypergradient's does)
            where = f"the checkpoint {checkpoint} holds" if checkpoint is not None else "it is at"
            raise ValueError(
                f"steps={steps} is the total number of UL steps, and this problem's run is "
                f"past it: {where} UL step {start}. Give steps >= {start} to go on, or start a "
                "new run (a new BilevelProblem; another checkpoint path, or delete the file)."
            )
        if callable(data):
            batches: Iterable[Batch] = (data(i) for i in range(start, steps))
        else:
            batches = self._batches(data, start, steps)
        record = None
        main = distributed.is_main_process()  # only rank 0 prints, logs and saves
        saved = {"step": start, "time": time.monotonic()}

        def save() -> None:
            if checkpoint is not None and main and saved["step"] != self.step_count:
                self.save_checkpoint(checkpoint)
            saved["step"], saved["time"] = self.step_count, time.monotonic()

        bar = tqdm(total=steps, initial=start, disable=not (progress and main), desc=self.ul.name)
        with bar:
            for batch in batches:
                if isinstance(batch, dict):
                    loss = self.meta_step(batch)
                elif isinstance(batch, tuple | list) and len(batch) == 2:
                    loss = self.step(*batch)
                else:
                    raise TypeError(
                        "each batch of data must be (train, val), with (data, target) pairs, "
                        'or a task batch {"train": (x, y), "test": (x, y)}; got a '
                        f"{type(batch).__name__} at UL step {self.step_count}."
                    )
                bar.update(1)
                done = self.step_count
                if done % log_every == 0 or done == steps:
                    record = self.log_record(loss)
                    bar.set_postfix(ul_loss=f"{record['ul_loss']:.4g}")
                    if log is not None and main:
                        log(record)
                late = checkpoint_seconds is not None and (
                    time.monotonic() - saved["time"] >= checkpoint_seconds
                )
                if done % checkpoint_every == 0 or done == steps or late:
                    save()
                if self._stopping():
                    save()
                    distributed.barrier()  # no process exits while rank 0 still writes
                    self._stop(steps, checkpoint)
        if self.step_count < steps:
            save()
        if checkpoint is not None:
            # no process returns (and none reads the checkpoint again, resuming a next run)
            # before rank 0 has written its last save
            distributed.barrier()
        if self.step_count < steps:
            kept = f"; the checkpoint {checkpoint} holds it" if checkpoint is not None else ""
            raise ValueError(
                f"data ran out after {self.step_count - start} batches (UL steps {start} to "
                f"{self.step_count}), but steps={steps}: the run stopped at UL step "
                f"{self.step_count}{kept}. Give at least steps batches (a function step -> "
                "batch, or e.g. itertools.cycle(loader) for several epochs), or lower steps."
            )
        if self._signal is not None:  # arrived after the last step, which was saved
            self._stop(steps, checkpoint)
        return record

    @contextlib.contextmanager
    def _signals(self, enabled: bool) -> Iterator[None]:
        """While ``run`` runs: SIGTERM and SIGINT ask for a stop after the UL step under way
        (a second one stops at once: ``KeyboardInterrupt`` for SIGINT, ``SystemExit(143)``
        for SIGTERM, the last checkpoint standing). Only from the main thread (elsewhere
        Python cannot install handlers, and signals keep their usual effect)."""
        self._signal, self._peer_stop = None, False
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._signal is None:
                self._signal = signum
                return
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            stop = SystemExit(128 + signum)  # a second SIGTERM (a scheduler insisting): now
            stop.signal = signum  # (a caller's loop tells a signal's stop from another exit)
            raise stop

        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, OSError):
                previous[signum] = signal.signal(signum, handler)
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, signal.SIG_DFL if old is None else old)

    def _stopping(self) -> bool:
        """Whether to stop after this UL step: under ``torch.distributed`` the flag every
        process read from the step's all-reduce (all agree); otherwise this process's."""
        if distributed.active():
            return self._peer_stop
        return self._signal is not None

    def _stop(self, steps: int, checkpoint: str | os.PathLike | None, saved: bool = True) -> None:
        """Raise :class:`Interrupted` (``KeyboardInterrupt`` for SIGINT) after a signal;
        ``saved``: whether ``checkpoint`` holds the run (an online run stopped before its
        first UL update has nothing to save)."""
        signum = signal.SIGTERM if self._signal is None else self._signal
        self._signal, self._peer_stop = None, False
        name = signal.Signals(signum).name
        if checkpoint is None:
            kept = "no checkpoint path was given: nothing was saved"
        elif not saved:
            kept = (
                f"nothing was saved to {checkpoint}: the run stopped before its first UL "
                "update, so the same command starts it over"
            )
            checkpoint = None
        else:
            kept = f"checkpoint saved to {checkpoint}: run the same command to resume"
        message = f"{name}: stopped after UL step {self.step_count} of {steps}; {kept}."
        if signum == signal.SIGINT:
            raise KeyboardInterrupt(message)
        if distributed.is_main_process():
            print(f"bilevel: {message}", file=sys.stderr, flush=True)
        raise Interrupted(signum, self.step_count, checkpoint)


def _refuse_empty(member: Any, name: str) -> None:
    """Raise if every tensor of a batch's member (with a first dimension) has no rows: an
    objective's mean over them is NaN, which the methods would report as a numerical
    failure (a step size to lower) rather than as the empty batch it is. (A tensor with
    rows, the usual member, is let through by the caller without this call.)"""
    shapes = [tuple(t.shape) for _, t in tensor_leaves(member, name) if t.ndim]
    if not shapes or any(shape[0] for shape in shapes):
        return
    raise ValueError(
        f"{name} is empty (shape {shapes[0]}: no rows): the objectives would average over "
        "nothing. Pass a batch with at least one example."
    )


_ABSENT = object()


class _StepStart:
    """What a UL step that raises puts back, so that catching the error and stepping again
    (or saving a checkpoint) is safe: ``.grad`` of the UL parameters, the method's state
    across UL steps (its sampler's draws; the changes it commits are held until the UL step
    is taken), its diagnostics, the models' buffers (batch-norm running statistics), the torch
    generators of the CPU and of the first UL parameter's CUDA device (dropout draws) and the
    last LL loss. Cheap: references, and copies of the buffers, the generators' states and
    what the method's ``state_at_step_start`` copies (no LL or UL weights, nor LL-sized
    variables that the method's step replaces)."""

    def __init__(self, problem: BilevelProblem) -> None:
        self.problem = problem
        ul = problem.ul
        # (map and chain rather than comprehensions: this runs at every UL step, and a
        # sub-millisecond step feels each Python frame; tests/test_lean_darts.py counts them)
        params = [*ul.ul_params, *_optimized(problem.ul_optimizer)]
        self.grads = list(zip(params, map(_GRAD, params), strict=True))
        self.method = ul.state_at_step_start() if hasattr(ul, "state_dict") else None
        diagnostics = getattr(ul, "diagnostics", None)
        self.diagnostics = None if diagnostics is None else dict(diagnostics)
        buffers = problem._all_buffers()
        self.buffers = list(zip(buffers, map(_detached_copy, buffers), strict=True))
        self.device = params[0].device
        self.rng = torch.get_rng_state()
        self.device_rng = (
            torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        )
        self.last_ll_loss = problem.last_ll_loss

    def put_back(self, error: BaseException) -> None:
        """Put everything back after the step failed with ``error``. A method state that no
        longer loads (the trainable LL parameters changed, which ``error`` is then about) is
        noted on ``error`` rather than raised in its place, and the rest is put back still."""
        problem = self.problem
        for p, grad in self.grads:
            p.grad = grad
        if self.method is not None:
            try:
                problem.ul.load_state_dict(self.method)
            except Exception as restore_error:
                error.add_note(f"(The method's state could not be put back: {restore_error})")
        if self.diagnostics is not None:
            problem.ul.diagnostics = self.diagnostics
        put_back_buffers(self.buffers)
        torch.set_rng_state(self.rng)
        if self.device_rng is not None:
            torch.cuda.set_rng_state(self.device_rng, self.device)
        problem.last_ll_loss = self.last_ll_loss


def _optimized(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The parameters of an optimizer, group after group."""
    return itertools.chain.from_iterable(map(_PARAMS, optimizer.param_groups))


def _versions(optimizer: torch.optim.Optimizer) -> list[int]:
    """The version counters (in-place changes) of an optimizer's parameters and state."""
    tensors = list(_optimized(optimizer))
    for state in optimizer.state.values():
        tensors += filter(torch.is_tensor, state.values())
    return list(map(_VERSION, tensors))


_GRAD = operator.attrgetter("grad")
_PARAMS = operator.itemgetter("params")
_VERSION = operator.attrgetter("_version")


def _detached_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _module_differences(name: str, saved: Any, module: torch.nn.Module) -> list[tuple[str, str]]:
    """How a saved ``state_dict`` differs from ``module``'s, as ``(description, kind)``:
    entries missing or extra, other shapes or dtypes (``kind`` ``"dtype"`` for the last, which
    only a non-strict load accepts, by casting; the others no load accepts)."""
    if not isinstance(saved, dict):
        return [(f"{name} is a {type(saved).__name__}, not a state_dict", "type")]
    mine = module.state_dict()
    out = []
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing:
        out.append((f"{name} lacks {', '.join(missing)}", "missing"))
    if extra:
        out.append((f"{name} has {', '.join(extra)}, which this model does not", "extra"))
    for key in sorted(set(mine) & set(saved)):
        a, b = saved[key], mine[key]
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape:
            out.append((f"{name}.{key}: shape {list(a.shape)} -> {list(b.shape)}", "shape"))
        elif a.dtype != b.dtype:
            out.append((f"{name}.{key}: dtype {a.dtype} -> {b.dtype}", "dtype"))
    return out


def _check_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer | None) -> None:
    """Refuse a UL scheduler that is not one of ``optimizer``'s, or one that needs a value
    at each step (ReduceLROnPlateau: step it yourself, on a validation metric)."""
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError(
            "ul_scheduler: ReduceLROnPlateau steps on a metric, which BilevelProblem does not "
            "have (a UL loss on one batch is noise). Step it yourself on a validation metric "
            "(e.g. in run(..., log=...)) and keep its state_dict with the checkpoint."
        )
    for name in ("step", "state_dict", "load_state_dict"):
        if not callable(getattr(scheduler, name, None)):
            raise TypeError(
                f"ul_scheduler must be a torch.optim.lr_scheduler scheduler (with {name}()), "
                f"got {type(scheduler).__name__}."
            )
    if optimizer is None or getattr(scheduler, "optimizer", None) is not optimizer:
        raise ValueError(
            "ul_scheduler must schedule the ul_optimizer given to BilevelProblem (build it as "
            "torch.optim.lr_scheduler.X(ul_optimizer, ...))."
        )


def _plain_setting(value: Any) -> bool:
    """Whether a checkpoint can hold ``value`` (as :func:`bilevel.checkpoint.plain` makes it:
    a NumPy scalar too), and a load set it again."""
    value = ckpt.plain(value)
    return value is None or type(value) in (bool, int, float, str)


def _same_setting(a: Any, b: Any) -> bool:
    """Whether two values of a setting are the same: equal plain values, or one object."""
    return a is b or (_plain_setting(a) and _plain_setting(b) and a == b)


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``settings`` with nested dicts spread out under dotted keys (``ul_calculator.k``), so
    that a refused resume names the setting that differs."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _recorded(settings: dict[str, Any], key: str) -> str:
    """How a refused resume shows the setting ``key``: its value, or ``(default)`` where it is
    not recorded (settings at their default are left out)."""
    return repr(settings[key]) if key in settings else "(default)"


def _seed_of(state: torch.Tensor) -> int:
    """A seed determined by a generator state, without drawing from it (CRC-32 of its
    bytes)."""
    return zlib.crc32(state.numpy().tobytes())


def _length(data: Iterable[Any]) -> int | None:
    """``len(data)`` if it has one (a list, a ``DataLoader``), else ``None``."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def _located(error: FloatingPointError, where: str) -> FloatingPointError:
    """``error`` again, of the same type, its message prefixed with where it happened."""
    try:
        located = type(error)(f"{where}: {error}")
    except Exception:  # a subclass with another signature
        located = FloatingPointError(f"{where}: {error}")
    located.__dict__.update(error.__dict__)  # e.g. the measurements of a diverging LL
    return located


#: ``torch.optim`` hyperparameters that are numbers (bools are refused: True reads as 1)
NUMERIC_OPTIONS = (
    "lr", "momentum", "dampening", "weight_decay", "eps", "betas", "alpha", "lr_decay",
    "initial_accumulator_value", "rho", "etas", "step_sizes", "lambd", "t0",
)  # fmt: skip


def _check_optimizer(optimizer: torch.optim.Optimizer, ul: Any, ll: Any) -> None:
    """Refuse a UL optimizer over tensors that are not the UL model's parameters (they never
    receive a hypergradient and would silently never move), or over none of them."""
    mine = {id(p) for p in ul.ul_model.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [p for p in held if id(p) not in mine]
    kind = type(optimizer).__name__
    if foreign:
        ll_names = {id(p): n for n, p in ll.ll_model.named_parameters()}
        named = [
            f"ll_model.{ll_names[id(p)]}"
            if id(p) in ll_names
            else f"a tensor of shape {list(p.shape)}"
            for p in foreign[:4]
        ]
        more = f" and {len(foreign) - 4} more" if len(foreign) > 4 else ""
        raise ValueError(
            f"ul_optimizer holds {len(foreign)} tensor(s) that are not parameters of the UL model "
            f"(ul_model): {', '.join(named)}{more}. They never receive a hypergradient, so they "
            f"would never move. Build it over the UL model: torch.optim.{kind}("
            "ul_model.parameters(), ...)."
        )
    for i, group in enumerate(optimizer.param_groups):
        for key in NUMERIC_OPTIONS:
            values = group.get(key)
            values = values if isinstance(values, tuple | list) else [values]
            if any(isinstance(v, bool) for v in values):
                raise TypeError(
                    f"ul_optimizer's {key} is {group[key]!r} (param group {i}): a bool is not a "
                    f"number (True would be read as 1). Give {key} as a number."
                )
    trainable = {id(p) for p in ul.ul_params}
    if not any(id(p) in trainable for p in held):
        raise ValueError(
            "ul_optimizer holds none of the UL parameters that receive hypergradients (those of "
            f"ul_model with requires_grad): nothing would move. Build it over the UL model: "
            f"torch.optim.{kind}(ul_model.parameters(), ...)."
        )
    stepped = {id(p) for p in held}
    named = ul.ul_model.named_parameters()
    left = [(n, p) for n, p in named if p.requires_grad and id(p) not in stepped]
    if left:
        more = f" and {len(left) - 4} more" if len(left) > 4 else ""
        ll_weights = {id(p) for p in ll.ll_model.parameters()}
        initialization = any(id(p) in ll_weights for _, p in left)
        cure = (
            "Some are the LL model's weights (ul_model holds ll_model: a learned "
            "initialization); if the initialization is not to be learned, keep ll_model out "
            "of ul_model. Otherwise"
            if initialization
            else "Freeze those meant to stay (requires_grad_(False)), or"
        )
        raise ValueError(
            f"ul_optimizer leaves out UL parameter(s) that receive hypergradients: "
            f"{', '.join(f'ul_model.{n}' for n, _ in left[:4])}{more}. They would never move, and "
            "their .grad, which only the optimizer's parameters have cleared, would add up "
            f"across UL steps (a clipping hook would see its norm grow). {cure} build the "
            f"optimizer over all of them: torch.optim.{kind}(ul_model.parameters(), ...)."
        )

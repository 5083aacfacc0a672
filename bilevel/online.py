"""Online hypergradient descent: UL updates every few LL steps, without restarting the LL."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bilevel import checkpoint as ckpt
from bilevel.ll import GradientDescent, Unroll
from bilevel.ll.unroll import restore_model
from bilevel.problem import (
    BilevelProblem,
    Pair,
    _located,
    _NonStrictLoadCures,
    check_pair,
    check_run_options,
    resume_strictly,
)
from bilevel.settings import check_count
from bilevel.state import check_finite, check_hypergradient
from bilevel.ul import Forward, Truncated
from bilevel.ul.forward import tangent_count


class _FixedAtConstruction:
    """A part of :class:`OnlineHypergradient`, read as an attribute and refused as an
    assignment: its checkpoints record the part (the LL settings, ``hyper_every``, the UL
    optimizer's state) and a resume checks them, so one replaced afterwards would run while
    they described the old one."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, runner: Any, owner: type | None = None) -> Any:
        return self if runner is None else runner.__dict__["_" + self.name]

    def __set__(self, runner: Any, value: Any) -> None:
        raise AttributeError(
            f"OnlineHypergradient's {self.name} is fixed at construction: its checkpoints "
            "record it and a resume checks it, so one replaced afterwards would run while they "
            f"describe the old one. Build a new OnlineHypergradient with the {self.name} you "
            "want (settings of the LL optimizer, the method and the UL optimizer may change in "
            "place)."
        )


class OnlineHypergradient:
    """Update the UL variables every ``hyper_every`` LL steps of one continuing LL run.

    With :class:`bilevel.ul.Forward` this is Real-Time Hyperparameter Optimization (RTHO):
    the tangents ``Z_t`` keep accumulating across UL updates. With
    :class:`bilevel.ul.Truncated` (``truncate_iter = hyper_every``) it is online truncated
    reverse: back-propagation through the LL steps since the last update.

    The online hypergradient is **biased**: ``Z_t`` mixes derivatives taken at earlier values
    of the UL variables (Forward), or ignores the steps before the window (Truncated), and the
    LL never reaches the solution for the current UL variables. It pays when an LL run is
    expensive and the UL variables need many updates: many UL updates per LL run instead of
    one.

    An online run resumes bitwise, as :meth:`BilevelProblem.run <bilevel.BilevelProblem.run>`
    does: ``run(..., checkpoint=path)`` saves after UL updates (atomically, in the format of
    :mod:`bilevel.checkpoint`, loaded without running code) what continuing needs: the UL
    model and optimizer, the LL run's fast weights, buffers, update-rule state and step
    count, the tangents ``Z_t`` (RTHO), the UL update count and the RNG states. The truncated
    window is empty right after an update (the graph is cut there), so nothing of it is
    saved; a run stopped between updates redoes the LL steps since the last saved one, with
    the same batches and random draws.

    Reference: Franceschi, Donini, Frasconi & Pontil (2017), "Forward and Reverse
    Gradient-Based Hyperparameter Optimization", ICML (RTHO); Shaban et al. (2019).

    Args:
        ll: the LL optimizer (its ``iters`` is not used: ``run`` says how many steps).
        ul: a ``Forward`` or ``Truncated`` calculator on the same models.
        ul_optimizer: the ``torch.optim`` optimizer of the UL parameters.
        hyper_every: LL steps between UL updates (for ``Truncated``, its ``truncate_iter``).
    """

    def __init__(
        self,
        ll: GradientDescent,
        ul: Forward | Truncated,
        ul_optimizer: torch.optim.Optimizer,
        hyper_every: int,
    ) -> None:
        if not isinstance(ul, Forward | Truncated):
            raise TypeError(
                f"online hypergradients need Forward or Truncated, got {type(ul).__name__}."
            )
        check_count(hyper_every, "hyper_every")
        _check_truncation(ul, hyper_every)
        if not isinstance(ul_optimizer, torch.optim.Optimizer):  # (BilevelProblem takes None)
            raise TypeError("ul_optimizer must be a torch.optim.Optimizer.")
        # BilevelProblem's checks of the models and ul_optimizer, and its checkpoints (settings
        # checked on resume, UL model and optimizer, LL model, RNG, all-or-nothing loads,
        # signals), with the online run's settings added
        self._problem = _OnlineCheckpoints(ll, ul, ul_optimizer)
        self._ll, self._ul, self._ul_optimizer = ll, ul, ul_optimizer
        self._hyper_every = hyper_every
        self._problem.settings["online"] = {"hyper_every": hyper_every}
        self._running = False  # inside run(): state_dict() only at a UL update
        #: the online run at its latest UL update (``online`` part of :meth:`state_dict`) and
        #: the RNG states then; ``None``: no run in progress, the next starts from ``ll_model``
        self._held: tuple[dict[str, Any], dict[str, Any]] | None = None
        self._resume = False  # a loaded state: the next run continues it
        self._live: tuple[Unroll, int] | None = None  # a run at a UL update (during ``log``)

    # its parts, fixed at construction (see _FixedAtConstruction); their settings (the LL
    # optimizer's, the method's, the UL optimizer's hyperparameters) may change in place
    ll = _FixedAtConstruction()  #: the LL optimizer (``GradientDescent``)
    ul = _FixedAtConstruction()  #: the hypergradient method (``Forward`` or ``Truncated``)
    ul_optimizer = _FixedAtConstruction()  #: the UL optimizer
    hyper_every = _FixedAtConstruction()  #: LL steps between UL updates

    def run(
        self,
        train: Pair | Callable[[int], Pair],
        val: Pair | Callable[[int], Pair],
        ll_steps: int,
        log: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = True,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        checkpoint_seconds: float | None = None,
    ) -> torch.nn.Module:
        """Run ``ll_steps`` LL steps, with a UL update after every ``hyper_every`` of them.

        Each call is one LL run from ``ll_model``'s weights, which it leaves as they are (the
        trained LL model is returned): a second call starts the LL again from them, while the
        UL variables and ``ul_optimizer`` carry on. A call resumes instead the run that
        ``checkpoint`` holds, if that file exists, or the state given to
        :meth:`load_state_dict` / :meth:`load_checkpoint` just before.

        With a ``checkpoint``, the run is saved after UL updates and resumes bitwise: the
        resumed run continues from the latest saved update and ends exactly where the
        uninterrupted one does (LL steps taken after that update are taken again, with the
        same batches and random draws). SIGTERM and SIGINT finish the LL steps up to the next
        UL update, save and raise :class:`bilevel.problem.Interrupted` or
        ``KeyboardInterrupt``, as :meth:`BilevelProblem.run <bilevel.BilevelProblem.run>`
        does. A finished run resumed with a larger ``ll_steps`` continues as the longer run
        would have run uninterrupted.

        Args:
            train: the LL batch, or a function ``LL step -> batch`` (what a resumed run needs:
                it asks for the batches from the resumed LL step on).
            val: the UL batch, or a function ``UL update -> batch``.
            ll_steps: total LL steps.
            log: called after each UL update with step numbers, UL loss and LL loss.
            progress: show a tqdm progress bar.
            checkpoint: file to resume from and save to (atomically), or ``None``. Under
                ``torch.distributed`` every process runs and saves its own online run: give
                each its own file (``f"online{rank}.pt"``), or they overwrite each other's.
            checkpoint_every: UL updates between checkpoints (and one at the last update).
            checkpoint_seconds: also save when this many seconds have passed since the last
                save (checked at each UL update); ``None``: by updates only.

        Returns:
            The LL model (patched) after the last step.

        Raises:
            bilevel.checkpoint.CheckpointError: ``checkpoint`` is damaged, unsafe or not a
                checkpoint of an online run.
            ValueError: ``checkpoint`` was written by a run with other settings or other
                LL weights trainable, or holds a run past ``ll_steps`` (a state given to
                :meth:`load_state_dict` then stays loaded, for the next call); a batch is of
                another dtype or device than the models (``TypeError``: not a pair).
            bilevel.ll.LowerLevelDivergenceError: the LL loss grew over the first
                ``hyper_every`` steps on a fixed ``train`` batch (the LL's ``on_growth``).
        """
        if isinstance(ll_steps, bool) or not isinstance(ll_steps, int) or ll_steps < 0:
            raise ValueError(f"ll_steps must be an integer >= 0, got {ll_steps!r}.")
        check_run_options(checkpoint_seconds, log, checkpoint_every=checkpoint_every)
        with self._problem._signals(checkpoint is not None):
            self._running = True
            try:
                return self._run(
                    train, val, ll_steps, log, progress, checkpoint, checkpoint_every,
                    checkpoint_seconds,
                )  # fmt: skip
            finally:
                self._live = None
                self._running = False

    def _run(
        self,
        train: Pair | Callable[[int], Pair],
        val: Pair | Callable[[int], Pair],
        ll_steps: int,
        log: Callable[[dict[str, Any]], None] | None,
        progress: bool,
        checkpoint: str | os.PathLike | None,
        checkpoint_every: int,
        checkpoint_seconds: float | None,
    ) -> torch.nn.Module:
        # a setting of the method or the LL changed since construction: checked as then
        self._check_settings()
        if checkpoint is not None and Path(checkpoint).exists():
            resume_strictly(self.load_checkpoint, checkpoint, "runner")
        if not self._resume:
            self._held = None  # a new LL run, from ll_model's weights
        held = None if self._held is None else self._held[0]
        start = 0 if held is None else held["ll_step"]
        if start > ll_steps:  # refused: the loaded run stays loaded for the call it asks for
            raise ValueError(
                f"the online run to resume is at LL step {start}, past ll_steps = {ll_steps}: "
                "give ll_steps >= that, or start a new run (another checkpoint path, or delete "
                "the file)."
            )
        self._resume = False
        updates = start // self.hyper_every
        self._problem.step_count = updates
        if held is not None and start == ll_steps:  # nothing left to run
            model = self.ll.patched_model(graph_from_start=False)
            restore_model(model, held["run"])
            return model
        batch = self._checked_batches(train, "train")
        val_batch = self._checked_batches(val, "val")
        graph = isinstance(self.ul, Truncated)
        first = batch(start)  # asked once: a batch function may read the next batch of a loader
        unroll = self.ll.start(*first, observer=self.ul.observer(self.ll))
        if held is not None:
            unroll.load_state_dict(held["run"])
        if not unroll.schedule.constant and ll_steps > self.ll.iters:
            raise ValueError(
                f"a hyperparameter of the LL is a per-step schedule of ll.iters = {self.ll.iters} "
                f"steps, but the online run takes ll_steps = {ll_steps}: build the LL with "
                "iters >= ll_steps, or give that hyperparameter as one value."
            )
        ll_losses = []
        saved_at = time.monotonic()
        bar = tqdm(
            range(start, ll_steps),
            initial=start,
            total=ll_steps,
            disable=not progress,
            desc=f"online {self.ul.name}",
        )
        for step in bar:
            data, target = first if step == start else batch(step)
            unroll.set_batch(data, target)
            ll_losses.append(unroll.step(graph=graph))
            if (step + 1) % self.hyper_every:
                continue
            # a setting changed since the last update (from log, say): checked before it is used
            self._check_settings()
            losses = torch.stack(ll_losses)
            check_finite(losses, f"the LL loss before LL step {step + 1}")
            if step + 1 == self.hyper_every and not callable(train):
                # the first window is an LL run from ll_model's weights on one batch at one
                # UL point, as BilevelProblem's runs are: checked for growth as they are (a
                # step size that diverges from the start). Later windows start near the LL's
                # solution, where their few losses differ by noise (dropout, Adam's moves)
                try:
                    self.ll._check_losses(losses, unroll)
                except FloatingPointError as error:
                    where = f"online {self.ul.name}, LL steps 1-{step + 1}"
                    raise _located(error, where) from None
            trajectory = unroll.record(losses, len(ll_losses) if graph else 0)
            self.ul_optimizer.zero_grad(set_to_none=True)
            ul_loss = self.ul.accumulate(trajectory, val_batch(updates), (data, target))
            try:  # (the finite entries of a hypergradient can have an infinite sum)
                check_hypergradient([p.grad for p in self.ul.ul_params if p.grad is not None])
            except FloatingPointError as error:
                raise _located(error, f"online {self.ul.name}, LL step {step + 1}") from None
            self.ul_optimizer.step()
            self._held = None  # the UL variables moved on: an earlier position no longer fits
            updates += 1
            # hyperparameters computed from the UL model (callables): at the new UL point, with
            # a fresh graph (the old one would be stale, and freed by Truncated's backward)
            unroll.schedule = self.ll.schedule()
            if graph:
                unroll.cut()
            unroll.check_again()  # a Function taken from this window on is refused in it
            self._problem.step_count = updates
            self._live = (unroll, step + 1)  # what state_dict() holds now
            if log is not None:
                log(
                    {
                        "ll_step": step + 1,
                        "ul_step": updates,
                        "ul_loss": float(ul_loss),
                        "ll_loss": float(losses[-1]),
                    }
                )
            last = step + 1 + self.hyper_every > ll_steps  # the run's last UL update
            stopping = self._problem._signal is not None
            late = checkpoint_seconds is not None and (
                time.monotonic() - saved_at >= checkpoint_seconds
            )
            if checkpoint is not None and (
                updates % checkpoint_every == 0 or last or late or stopping
            ):
                self.save_checkpoint(checkpoint)
                saved_at = time.monotonic()
            if last or stopping:  # kept after the run: what state_dict() returns then
                self._held = self._capture()
            self._live = None
            if stopping:
                self._problem._stop(ll_steps // self.hyper_every, checkpoint)
            ll_losses = []
        if self._problem._signal is not None:  # arrived after the last update, which was saved
            saved = checkpoint is not None and Path(checkpoint).exists()  # (or none was made)
            self._problem._stop(ll_steps // self.hyper_every, checkpoint, saved)
        return unroll.model

    def _checked_batches(
        self, given: Pair | Callable[[int], Pair], name: str
    ) -> Callable[[int], Pair]:
        """``given`` as a function of the step, whose batches are checked as
        :meth:`BilevelProblem.step <bilevel.BilevelProblem.step>` checks its arguments: a pair,
        on the models' device and of their dtype (a fixed batch once, here)."""

        def checked(pair: Any, step: int | None = None) -> Pair:
            try:
                check_pair(pair, name)
                self._problem._check_data({name: pair})
            except (TypeError, ValueError) as error:
                if step is None:
                    raise
                raise type(error)(f"the batch {name}({step}) returned: {error}") from None
            return pair

        if not callable(given):
            checked(given)
            return lambda step: given
        return lambda step: checked(given(step), step)

    def _check_settings(self) -> None:
        """Check the method against the LL optimizer again where a setting of either changed,
        as at construction, and online ``Truncated``'s window."""
        self.ul.check_against_once(self.ll)
        _check_truncation(self.ul, self.hyper_every)

    def _capture(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ``online`` part of :meth:`state_dict` and the RNG states, now (at a UL update,
        or as held)."""
        if self._live is not None:
            unroll, ll_step = self._live
            return {"ll_step": ll_step, "run": unroll.state_dict()}, ckpt.rng_state()
        if self._running:  # between UL updates: the UL variables moved, the LL run has not
            raise RuntimeError(
                "OnlineHypergradient.state_dict() during run() holds the run at a UL update: "
                "call it from log (which run calls at each update), or let run(checkpoint=...) "
                "save it. Between updates the UL variables have moved and the LL run's state "
                "is not one a resume could continue."
            )
        if self._held is not None:
            return self._held
        return {"ll_step": 0, "run": None}, ckpt.rng_state()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the online run, as tensors and plain values (a
        weights-only load accepts it): :meth:`BilevelProblem.state_dict
        <bilevel.BilevelProblem.state_dict>` (UL model and optimizer, LL model, settings, UL
        updates as ``step``) and, under ``online``, the LL step and the LL run's state
        (``Unroll.state_dict``: fast weights, buffers, update-rule state,
        tangents ``Z_t``), with the RNG states of that moment.

        That is the run at a UL update: during :meth:`run`, the current one (call it from
        ``log``); after it, the last one (the LL steps after it are taken again on resume);
        with no run in progress, or after a run that raised past one of its UL updates (only
        a ``checkpoint`` file keeps that update), a new run from ``ll_model``'s weights
        (``ll_step`` 0). The tensors are copies: a state kept in memory stays that of its UL
        update while the run goes on (a module's ``state_dict`` would share the UL
        parameters' and the optimizer's tensors, which the next UL updates change in place).

        Raises:
            ValueError: a setting was changed to one that :meth:`run` refuses (``Truncated``'s
                ``truncate_iter`` other than ``hyper_every``; a method and an LL optimizer that
                disagree): a state holding it could not be resumed. Set it back first.
        """
        return self._state_dict(snapshot=True)

    def _state_dict(self, snapshot: bool) -> dict[str, Any]:
        """:meth:`state_dict`; without ``snapshot`` its tensors are shared with the models, the
        UL optimizer and the runner's record of its last update (a checkpoint written at
        once)."""
        # a setting the run refuses would be refused at every resume of this state (one
        # changed from log, saved at that update, made the run's checkpoint unresumable)
        self._check_settings()
        online, rng = self._capture()
        state = self._problem.state_dict()
        state["step"] = online["ll_step"] // self.hyper_every
        state["rng"] = rng
        state["online"] = online  # (after a run: the runner's own record of its last update)
        return copy.deepcopy(state) if snapshot else state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` saved; the next :meth:`run` continues that run.

        Raises:
            ValueError: the state does not fit (see :meth:`BilevelProblem.load_state_dict
                <bilevel.BilevelProblem.load_state_dict>`: other settings, ``hyper_every``
                included, other models), its LL run cannot continue here (other LL weights
                trainable, or, with ``strict=False``, another method), or, with ``strict``,
                it holds no online run (a checkpoint of a :class:`BilevelProblem`). Nothing
                is changed then.
        """
        online, step = state.get("online"), state.get("step", 0)
        if online is None:
            if strict:
                raise _NonStrictLoadCures(
                    "the checkpoint holds no online run (it was not written by "
                    "OnlineHypergradient.state_dict, e.g. by a BilevelProblem). Resume from a "
                    "checkpoint written by this runner's save_checkpoint, or pass strict=False "
                    "to load its UL state and start a new LL run."
                )
            online, step = {"ll_step": 0, "run": None}, 0
        saved = (state.get("settings") or {}).get("online") or {}
        self._check_online(online, step, saved.get("hyper_every"))
        if online["run"] is not None and (
            not strict or state.get("settings") == ckpt.plain(self._problem.settings)
        ):  # (other settings, the method among them, are refused first and by name)
            self._check_run(online["run"])
        self._problem.load_state_dict(state, strict)  # all or nothing; checks the settings
        # a copy, as modules load one: the caller may change its dict afterwards
        self._held = copy.deepcopy((online, state["rng"])) if online["ll_step"] > 0 else None
        self._resume = True

    def _check_online(self, online: Any, step: Any, every: Any) -> None:
        """Refuse an ``online`` part that is not one :meth:`state_dict` writes (at a UL update
        of a run with ``hyper_every = every``, as the state records it: another value is
        refused as another setting)."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            every = self.hyper_every
        ll_step = online.get("ll_step") if isinstance(online, dict) else None
        run = online.get("run") if isinstance(online, dict) else None
        fits = (
            isinstance(ll_step, int)
            and not isinstance(ll_step, bool)
            and ll_step >= 0
            and ll_step % every == 0
            and step == ll_step // every
            and (run is None) == (ll_step == 0)
            and (
                run is None
                or (
                    isinstance(run, dict)
                    and run.get("steps") == ll_step
                    and isinstance(run.get("weights"), list)
                    and all(isinstance(run.get(k), dict) for k in ("buffers", "opt_state"))
                )
            )
        )
        if not fits:
            raise ValueError(
                f"the checkpoint's online run (LL step {ll_step!r}, UL update {step!r}) is not "
                f"one saved at a UL update of an online run with hyper_every = {every}: the "
                "file is damaged or was not written by OnlineHypergradient.state_dict. Restore "
                "it from a copy, or start a new run."
            )

    def _check_run(self, run: dict[str, Any]) -> None:
        """Refuse, before any change, a saved LL run that this runner cannot continue: one
        of another method (tangents or none), or with other LL weights trainable (the update
        rule's state and the tangents hold one tensor per trainable weight)."""
        forward = isinstance(self.ul, Forward)
        observer = run.get("observer")
        if (observer is not None) != forward:
            raise ValueError(
                f"the saved LL run {'carries no' if forward else 'carries'} forward-mode "
                f"tangents: it was saved by a run of another method than {self.ul.name!r}. "
                "Resume it with the method that saved it, or start a new run (another "
                "checkpoint path, or delete the file)."
            )
        trainable = [p for p in self.ll.ll_model.parameters() if p.requires_grad]
        n = tangent_count(self.ul.ul_params)
        # per trainable weight: the rule's state (its shape, or empty before it exists) and
        # the tangents (one row per real UL scalar: two per complex entry)
        saved = {k: (v, [p.shape for p in trainable]) for k, v in run["opt_state"].items()}
        if observer is not None:
            tangents = observer.get("tangents") if isinstance(observer, dict) else None
            saved["tangents"] = (tangents, [torch.Size([n, *p.shape]) for p in trainable])
        for key, (tensors, shapes) in saved.items():
            fits = (
                isinstance(tensors, list)
                and len(tensors) == len(trainable)
                and all(
                    isinstance(t, torch.Tensor) and (t.shape == shape or t.numel() == 0)
                    for t, shape in zip(tensors, shapes, strict=True)
                )
            )
            if not fits:
                got = [list(getattr(t, "shape", [])) for t in tensors or []]
                raise ValueError(
                    f"the saved LL run's {key} (shapes {got}) do not fit the trainable weights "
                    f"of this LL model (shapes {[list(p.shape) for p in trainable]}): resume "
                    "with the LL parameters trainable (requires_grad) as when it was saved, or "
                    "start a new run (another checkpoint path, or delete the file)."
                )

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (:func:`bilevel.checkpoint.save`)."""
        ckpt.save(path, self._state_dict(snapshot=False))

    def load_checkpoint(self, path: str | os.PathLike, strict: bool = True) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (see
        :meth:`load_state_dict`); the next :meth:`run` continues it.

        The file is read without running code from it (:func:`bilevel.checkpoint.load`).

        Raises:
            bilevel.checkpoint.CheckpointError: the file is missing, damaged, unsafe (a file
                crafted to run code) or not a checkpoint of an online run; the message names
                it and says what to do.
        """
        required = ("ul_model", "ll_model", "step", "rng", "online")
        self.load_state_dict(ckpt.load(path, require=required), strict=strict)


def _check_truncation(ul: Forward | Truncated, hyper_every: int) -> None:
    """Online ``Truncated`` back-propagates through the steps since the last UL update: its
    ``truncate_iter`` must be ``hyper_every`` (at construction, and when set later)."""
    if isinstance(ul, Truncated) and ul.truncate_iter != hyper_every:
        raise ValueError(
            f"Truncated online needs truncate_iter == hyper_every ({hyper_every}), got "
            f"{ul.truncate_iter}: it back-propagates through the steps since the last update."
        )


class _OnlineCheckpoints(BilevelProblem):
    """The checkpoints of an online run: an online run is one process's, so no models are
    broadcast when it is built, also under ``torch.distributed`` (each process may run its
    own, from its own initial values)."""

    broadcasts = False

"""BilevelProblem: composes a lower-level optimizer and an upper-level calculator."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bilevel import checkpoint as ckpt
from bilevel import distributed
from bilevel.ll import GradientDescent
from bilevel.state import all_finite

Pair = tuple[Any, Any]
Batch = Pair | tuple[Pair, Pair] | dict[str, Pair]


def split_tasks(batch: dict[str, Pair]) -> list[tuple[Pair, Pair]]:
    """Split a task batch ``{"train": (x, y), "test": (x, y)}`` (leading task dimension, as
    torchmeta's loaders give) into a list of ``(train, val)`` pairs, one per task."""
    if not isinstance(batch, dict) or "train" not in batch or "test" not in batch:
        raise TypeError('a task batch must be a dict {"train": (x, y), "test": (x, y)}.')
    (tx, ty), (vx, vy) = batch["train"], batch["test"]
    n = len(tx)
    for name, t in (("train x", tx), ("train y", ty), ("test x", vx), ("test y", vy)):
        if len(t) != n:
            raise ValueError(
                f"task batch {name} has {len(t)} tasks along its first dimension, expected {n}."
            )
    return [((tx[i], ty[i]), (vx[i], vy[i])) for i in range(n)]


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
            ``skipped_steps``). UL parameters never receive NaN.
    """

    def __init__(
        self,
        ll: GradientDescent,
        ul: Any,
        ul_optimizer: torch.optim.Optimizer | None = None,
        on_nonfinite: str = "raise",
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
        self.ll = ll
        self.ul = ul
        self.ul_optimizer = ul_optimizer
        self.on_nonfinite = on_nonfinite
        distributed.broadcast_modules(ul.ul_model, ll.ll_model)
        self.settings = self._settings()
        self.step_count = 0
        self.skipped_steps = 0
        self.last_ll_loss: torch.Tensor | None = None

    def _settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (taken at construction, so that LR
        schedulers that change the optimizer's groups later do not count)."""

        def plain(value: Any) -> Any:
            if isinstance(value, int | float | str | bool | type(None)):
                return value
            if isinstance(value, tuple | list):
                return [plain(v) for v in value]
            if isinstance(value, torch.Tensor):
                return value.item() if value.numel() == 1 else f"tensor{list(value.shape)}"
            return type(value).__name__

        opt = self.ul_optimizer
        settings = getattr(self.ul, "settings", None)
        calculator = {k: plain(v) for k, v in (settings() if settings else {}).items()}
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
        }

    @property
    def ul_params(self) -> list[torch.nn.Parameter]:
        """The UL parameters that receive hypergradients."""
        return self.ul.ul_params

    def _accumulate(self, tasks: Sequence[tuple[Pair, Pair]]) -> torch.Tensor:
        """Set ``.grad`` of the UL parameters (which must be ``None``) to the task-averaged
        hypergradient; return the mean UL loss. Under ``torch.distributed`` each process
        takes its share of the tasks and the shares are summed."""
        if not tasks:
            raise ValueError("no task to compute a hypergradient on.")
        mine, weight = distributed.shard(tasks)
        losses = []  # per task: the UL loss and the last LL loss
        for train, val in mine:
            losses.extend(self.ul.task_gradients(self.ll, train, val))
        reference = self.ul_params[0]  # no task on this process: zeros
        totals = torch.stack(losses).view(-1, 2).sum(0) if losses else reference.new_zeros(2)
        totals = totals.to(reference.dtype)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.ul_params]
        if weight != 1.0:
            for t in (*grads, totals):
                t.mul_(weight)
        *grads, totals = distributed.all_reduce_sum([*grads, totals])
        for p, g in zip(self.ul_params, grads, strict=True):
            p.grad = g
        ul_loss, ll_loss = totals.unbind()
        self.last_ll_loss = ll_loss
        return ul_loss

    def _hypergradient(self, tasks: Sequence[tuple[Pair, Pair]]) -> list[torch.Tensor]:
        saved = [p.grad for p in self.ul_params]
        for p in self.ul_params:
            p.grad = None
        try:
            self._accumulate(tasks)
            return [
                torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for p in self.ul_params
            ]
        finally:
            for p, old in zip(self.ul_params, saved, strict=True):
                p.grad = old

    def hypergradient(self, train: Pair, val: Pair) -> list[torch.Tensor]:
        """The hypergradient for one task, one tensor per UL parameter.

        UL parameters and their ``.grad`` are left unchanged.

        Args:
            train: ``(data, target)`` for the LL.
            val: ``(data, target)`` for the UL.
        """
        return self._hypergradient([(train, val)])

    def meta_hypergradient(self, batch: dict[str, Pair]) -> list[torch.Tensor]:
        """The hypergradient averaged over a task batch ``{"train": .., "test": ..}``."""
        return self._hypergradient(split_tasks(batch))

    def _step(self, tasks: Sequence[tuple[Pair, Pair]]) -> torch.Tensor:
        if self.ul_optimizer is None:
            raise ValueError("step needs a ul_optimizer: BilevelProblem(ll, ul, ul_optimizer).")
        self.ul_optimizer.zero_grad(set_to_none=True)
        where = f"UL step {self.step_count} ({self.ul.name})"
        try:
            loss = self._accumulate(tasks)
            if not all_finite([p.grad for p in self.ul_params]):
                raise FloatingPointError("the hypergradient is not finite (NaN or inf).")
        except FloatingPointError as error:
            if self.on_nonfinite == "raise":
                raise FloatingPointError(f"{where}: {error}") from error
            self.skipped_steps += 1
            self.ul_optimizer.zero_grad(set_to_none=True)
            self.step_count += 1
            return torch.tensor(float("nan"))
        self.ul_optimizer.step()
        self.step_count += 1
        return loss

    def step(self, train: Pair, val: Pair) -> torch.Tensor:
        """Zero the UL grads, compute the hypergradient, step the UL optimizer.

        Returns:
            The UL loss before the step (detached).
        """
        return self._step([(train, val)])

    def meta_step(self, batch: dict[str, Pair]) -> torch.Tensor:
        """:meth:`step` on a task batch, with the hypergradient averaged over tasks."""
        return self._step(split_tasks(batch))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: UL model, UL optimizer, LL model, step counters, RNG
        states and settings, as tensors and plain values (a weights-only load accepts it)."""
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
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "rng": ckpt.rng_state(),
            "settings": ckpt.plain(self.settings),
            # what a method keeps across UL steps (LL or auxiliary variables), if anything
            "method": self.ul.state_dict() if hasattr(self.ul, "state_dict") else None,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` saved.

        Raises:
            ValueError: with ``strict``, the state was saved by a problem with other settings
                (method, solver, LL steps or learning rate, UL optimizer and its
                hyperparameters, UL parameter shapes): resuming it would silently mix two runs.
        """
        saved = state.get("settings")
        current = ckpt.plain(self.settings)
        if strict and saved is not None and saved != current:
            changed = sorted(k for k in {*saved, *current} if saved.get(k) != current.get(k))
            details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ValueError(
                f"the checkpoint was written with other settings ({details}). Resume with the "
                "same settings, or start a new run with another checkpoint path (or delete it)."
            )
        self.ul.ul_model.load_state_dict(state["ul_model"])
        self.ll.ll_model.load_state_dict(state["ll_model"])
        if self.ul_optimizer is not None and state.get("ul_optimizer") is not None:
            self.ul_optimizer.load_state_dict(state["ul_optimizer"])
        self.step_count = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("method") is not None:
            self.ul.load_state_dict(state["method"])
        ckpt.set_rng_state(state["rng"])

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
    ) -> dict[str, Any] | None:
        """Run UL steps until ``steps`` have been taken, resuming from ``checkpoint`` if it
        exists.

        Args:
            data: a function ``step -> batch`` (resumes exactly), or an iterable of batches
                (on resume, the batches of the steps already taken are skipped). A batch is
                ``(train, val)`` with ``(data, target)`` pairs, or a task batch
                ``{"train": (x, y), "test": (x, y)}``.
            steps: total number of UL steps.
            checkpoint: file to resume from and save to (atomically), or ``None``.
            checkpoint_every: UL steps between checkpoints (and one at the end).
            log: called with a dict (step, UL and LL loss, solver diagnostics) every
                ``log_every`` steps. Under ``torch.distributed``, only rank 0 logs, shows the
                progress bar and writes the checkpoint; every rank resumes from it.
            log_every: UL steps between log records.
            progress: show a tqdm progress bar.

        Returns:
            The last log record, or ``None`` if no step was run.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}.")
        for name, value in (("checkpoint_every", checkpoint_every), ("log_every", log_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if checkpoint is not None and Path(checkpoint).exists():
            self.load_checkpoint(checkpoint)
        start = self.step_count
        if callable(data):
            batches: Iterable[Batch] = (data(i) for i in range(start, steps))
        else:
            batches = itertools.islice(iter(data), start, steps)
        record = None
        main = distributed.is_main_process()  # only rank 0 prints, logs and saves
        bar = tqdm(total=steps, initial=start, disable=not (progress and main), desc=self.ul.name)
        with bar:
            for batch in batches:
                if isinstance(batch, dict):
                    loss = self.meta_step(batch)
                else:
                    train, val = batch
                    loss = self.step(train, val)
                bar.update(1)
                done = self.step_count
                if done % log_every == 0 or done == steps:
                    record = self.log_record(loss)
                    bar.set_postfix(ul_loss=f"{record['ul_loss']:.4g}")
                    if log is not None and main:
                        log(record)
                save = done % checkpoint_every == 0 or done == steps
                if checkpoint is not None and main and save:
                    self.save_checkpoint(checkpoint)
        return record

"""Minibatch sampling for the stochastic bilevel methods (SOBA, SABA, StocBiO, AmIGO).

The runner hands a stochastic method the FULL train and validation data at every step; the
method draws its own minibatches from them through a :class:`Sampler`. The default sampler
splits each data set once into ``ceil(n / batch_size)`` fixed batches of equal size (up to
one sample), made of a random permutation of the samples, and visits them in a random order
each epoch (``order="reshuffle"``, as benchopt's ``benchmark_bilevel`` does) or draws one
uniformly at random at every call (``order="uniform"``, the i.i.d. sampling of the papers'
analyses). Fixed batches are what SABA's memory is indexed by.

Everything random comes from the sampler's own ``torch.Generator``, seeded by ``seed``, so a
run is reproducible whatever else draws from torch's global generator, and its state is
saved in checkpoints: a resumed run draws bitwise the batches the uninterrupted run would
have drawn.

A user replaces the sampler by subclassing :class:`Sampler` and overriding :meth:`draw`
(and :meth:`state_dict` / :meth:`load_state_dict` / :meth:`settings` if it keeps state).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bilevel.settings import Fixed
from bilevel.state import map_tensors

LEVELS = ("train", "val")
#: ``val_batch_size``'s default: the train batch size
SAME = "same"
#: what :func:`num_samples` advises for data it cannot draw rows from (the samplers' option)
TAKE_AS_GIVEN = "pass batch_size=None to use the data as given"


@dataclass(frozen=True)
class Minibatch:
    """One drawn minibatch of one level.

    Attributes:
        index: indices of its samples in the full data (a CPU ``LongTensor``), or ``None``
            when the minibatch is the whole data set, used as given.
        id: which of the fixed batches it is, in ``range(count)`` (SABA's memory slot).
        count: the number of fixed batches the data set is split into.
        weight: ``count * len(batch) / n``: the factor that makes the minibatch's loss (a mean
            over its samples) an unbiased estimate of the full loss under uniform batch
            sampling; ``1.0`` when all batches have the same size.
    """

    index: torch.Tensor | None
    id: int
    count: int
    weight: float

    @property
    def full(self) -> bool:
        """Whether this minibatch is the whole data set."""
        return self.index is None


def check_batch_size(value: Any, name: str) -> int | None:
    """Return ``value`` if it is a batch size (an integer >= 1) or ``None`` (full batch)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be an integer >= 1, or None for the full data set, got {value!r}."
        )
    return value


def num_samples(data: Any, target: Any, level: str, cure: str = TAKE_AS_GIVEN) -> int:
    """The number of samples of ``(data, target)``: the common length of the first dimension
    of every tensor in them (tensors, or tuples, lists and dicts of tensors; ``None``
    allowed). ``cure``: what the error for data without rows advises (the caller's option
    to use the data as given)."""
    lengths: list[int] = []
    _lengths(data, f"{level} data", lengths, cure)
    _lengths(target, f"{level} target", lengths, cure)
    if not lengths:
        raise TypeError(
            f"the {level} (data, target) hold no tensor: the sampler draws minibatches along the "
            "first dimension of tensors."
        )
    if any(n != lengths[0] for n in lengths):
        raise ValueError(
            f"the tensors of the {level} (data, target) have different numbers of samples along "
            f"their first dimension ({sorted(set(lengths))}); every tensor must hold one row per "
            "sample."
        )
    if lengths[0] < 1:
        raise ValueError(f"the {level} data set is empty (0 samples).")
    return lengths[0]


def _lengths(value: Any, name: str, out: list[int], cure: str = TAKE_AS_GIVEN) -> None:
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            raise ValueError(
                f"{name} holds a 0-dimensional tensor: the sampler needs one row per sample "
                f"along the first dimension ({cure})."
            )
        out.append(value.shape[0])
    elif type(value) is dict:  # the common case, before the slower abstract-class check
        for item in value.values():
            _lengths(item, name, out, cure)
    elif isinstance(value, tuple | list):
        for item in value:
            _lengths(item, name, out, cure)
    elif isinstance(value, Mapping):
        for item in value.values():
            _lengths(item, name, out, cure)
    else:
        raise TypeError(
            f"{name} must be a tensor, or a tuple, list or dict of tensors with one row per "
            f"sample, to draw minibatches from; got {type(value).__name__}. "
            f"{cure[:1].upper()}{cure[1:]}."
        )


def select(value: Any, index: torch.Tensor | None) -> Any:
    """The rows ``index`` of every tensor in ``value`` (tensors, tuples, lists, dicts, None);
    ``value`` itself when ``index`` is ``None``."""
    if index is None or value is None:
        return value

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, index if index.device == t.device else index.to(t.device))

    def refuse(other: Any) -> Any:
        if other is None:
            return None
        raise TypeError(f"cannot draw a minibatch from a {type(other).__name__}.")

    return map_tensors(value, rows, refuse)


@dataclass
class _Level:
    """The sampler's state for one level: the fixed split and where the epoch stands."""

    n: int
    perm: torch.Tensor  # the samples, permuted once; batch b is a slice of it
    order: torch.Tensor  # the batches' order in the current epoch
    position: int  # how many batches of the epoch were drawn
    #: ``order`` as Python ints, and the tensor it was read from (a subclass may replace
    #: ``order``: the list is then read again)
    order_list: list[int] | None = None
    order_of: torch.Tensor | None = None

    def batch_at(self, position: int) -> int:
        """The batch drawn at ``position`` of the current epoch (no tensor indexing)."""
        if self.order_of is not self.order:
            self.order_list, self.order_of = self.order.tolist(), self.order
        return self.order_list[position]  # type: ignore[index]


class _BatchSizes(Mapping[str, "int | None"]):
    """A sampler's batch size per level (``"train"``, ``"val"``), read-only: the data were
    split with them, and a size changed later would not match the split or the state."""

    def __init__(self, train: int | None, val: int | None) -> None:
        self._sizes = {"train": train, "val": val}

    def __getitem__(self, level: str) -> int | None:
        return self._sizes[level]

    def __iter__(self) -> Any:
        return iter(self._sizes)

    def __len__(self) -> int:
        return len(self._sizes)

    def _refuse(self, *change: Any) -> None:
        raise TypeError(
            "a Sampler's batch sizes are fixed at construction: its data are split into "
            "batches of them at the first draw, and its state follows that split. To change "
            "them, build a new Sampler(batch_size=..., val_batch_size=...) (and a new method)."
        )

    __setitem__ = __delitem__ = _refuse

    def __repr__(self) -> str:
        return repr(self._sizes)


class Sampler:
    """Draws index minibatches from the full train and validation data, reproducibly.

    Each level's data set (``n`` samples) is split once, at its first draw, into
    ``count = ceil(n / batch_size)`` fixed batches: consecutive slices of a random
    permutation, of sizes ``n // count`` or ``n // count + 1``. With ``count == 1`` (a
    ``batch_size`` of ``None`` or at least ``n``) the data are used as given, untouched (a
    method then takes its deterministic, full-batch steps) and nothing random is drawn.

    Every draw comes from the sampler's own ``torch.Generator`` seeded with ``seed``; its
    state, the splits and the epochs' positions are in :meth:`state_dict`.

    References: the minibatch scheme of benchopt's ``benchmark_bilevel`` (fixed batches,
    reshuffled each epoch); Dagréou, Ablin, Vaiter & Moreau (2022), "A framework for bilevel
    optimization that enables stochastic and global variance reduction algorithms", NeurIPS
    (uniform sampling).

    Args:
        batch_size: samples per train (LL) minibatch, or ``None`` for the full data set.
        val_batch_size: samples per validation (UL) minibatch, ``None`` for the full data
            set, or ``"same"`` (default) for ``batch_size``.
        seed: seeds the sampler's generator.
        order: ``"reshuffle"`` (each epoch visits every batch once, in a random order) or
            ``"uniform"`` (every draw picks a batch uniformly, with replacement).
    """

    seed = Fixed("the sampler's generator was seeded with it, and its state is the run's")
    batch_sizes = Fixed("its data are split into batches of them at the first draw")
    order = Fixed("the draws so far, and the epochs' positions in the state, follow it")

    def __init__(
        self,
        batch_size: int | None = 64,
        val_batch_size: int | str | None = SAME,
        seed: int = 0,
        order: str = "reshuffle",
    ) -> None:
        batch_size = check_batch_size(batch_size, "batch_size")
        if isinstance(val_batch_size, str) and val_batch_size == SAME:
            val_batch_size = batch_size
        else:
            val_batch_size = check_batch_size(val_batch_size, "val_batch_size")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}.")
        if order not in ("reshuffle", "uniform"):
            raise ValueError(f"order must be 'reshuffle' or 'uniform', got {order!r}.")
        self.batch_sizes = _BatchSizes(batch_size, val_batch_size)
        self.seed = seed
        self.order = order
        self.generator = torch.Generator().manual_seed(seed)
        self._levels: dict[str, _Level] = {}
        #: the fixed batches made so far, per (level, batch): they never change once split
        self._batches: dict[tuple[str, int], Minibatch] = {}

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed."""
        return {
            "sampler": type(self).__name__,
            "batch_size": self.batch_sizes["train"],
            "val_batch_size": self.batch_sizes["val"],
            "seed": self.seed,
            "order": self.order,
        }

    def count(self, level: str, n: int) -> int:
        """How many fixed batches a data set of ``n`` samples of ``level`` is split into."""
        size = self.batch_sizes[_check_level(level)]
        return 1 if size is None or size >= n else -(-n // size)

    def draw(self, level: str, n: int) -> Minibatch:
        """The next minibatch of ``level`` (``"train"`` or ``"val"``) from ``n`` samples.

        Raises:
            ValueError: ``n`` differs from the size of the data set this level was split from
                (the method is meant to be given the same full data at every step).
        """
        state = self._levels.get(level)
        if state is not None and state.n != n:  # also when n now fits in one batch
            raise ValueError(
                f"the sampler split the {level} data ({state.n} samples) into fixed batches, but "
                f"was now given {n} samples. Pass the same full {level} data set at every step "
                "(the method draws its own minibatches), or use batch_size=None to take the "
                "data as given."
            )
        count = self.count(level, n)
        if count == 1:
            return Minibatch(None, 0, 1, 1.0)
        state = self.split(level, n)
        if self.order == "uniform":
            batch = int(torch.randint(count, (1,), generator=self.generator))
        else:
            if state.position == count:
                state.order = torch.randperm(count, generator=self.generator)
                state.position = 0
            batch = state.batch_at(state.position)
            state.position += 1
        return self.batch(level, batch)

    def split(self, level: str, n: int) -> _Level:
        """Split ``level``'s data set of ``n`` samples into its fixed batches, if not done yet
        (this draws the permutation and the first epoch's order), and return the level's
        state."""
        state = self._levels.get(_check_level(level))
        if state is None:
            perm = torch.randperm(n, generator=self.generator)
            order = torch.randperm(self.count(level, n), generator=self.generator)
            state = self._levels[level] = _Level(n, perm, order, 0)
            self._batches = {k: b for k, b in self._batches.items() if k[0] != level}
        return state

    def batch(self, level: str, batch: int) -> Minibatch:
        """Fixed batch number ``batch`` of ``level``, whose data set must have been split
        (:meth:`split`, or a first :meth:`draw`). Draws nothing: SABA reads every batch
        through it to fill its memory at the initial point."""
        made = self._batches.get((level, batch))
        if made is not None:
            return made
        state = self._levels[_check_level(level)]
        count = self.count(level, state.n)
        base, extra = divmod(state.n, count)
        size = base + (batch < extra)
        start = batch * base + min(batch, extra)
        made = Minibatch(state.perm[start : start + size], batch, count, count * size / state.n)
        self._batches[(level, batch)] = made
        return made

    def state_dict(self) -> dict[str, Any]:
        """The generator's state, the splits and the epochs' positions (tensors and plain
        values)."""
        return {
            "generator": self.generator.get_state(),
            "levels": {
                name: {"n": s.n, "perm": s.perm, "order": s.order, "position": s.position}
                for name, s in self._levels.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next draws are bitwise those that followed it.

        A subclass that replaces :meth:`draw` (or :meth:`split`) may keep any epoch in a
        level's ``order``: a 1-d tensor of this sampler's batch numbers, in any number, with
        ``position`` in ``[0, len(order)]``; that is all its restored split is checked for.
        This class's own epochs are each a permutation of the batches, and are checked as
        such.

        Raises:
            ValueError: a split that is not this sampler's for its data set (saved with
                another batch size, so that its batches are numbered for another count: the
                draws would be empty or partial batches), or not a permutation of its
                samples; nothing is changed then.
        """
        try:
            generator = state["generator"]
            levels = {
                _check_level(name): _Level(
                    int(s["n"]), s["perm"].long().cpu(), s["order"].long().cpu(), int(s["position"])
                )
                for name, s in state["levels"].items()
            }
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"not a Sampler state (missing or malformed {error}); load what "
                "Sampler.state_dict() returned."
            ) from None
        for name, level in levels.items():
            self._check_split(name, level)
        self.generator.set_state(
            generator.cpu() if isinstance(generator, torch.Tensor) else generator
        )
        self._levels = levels
        self._batches = {}

    def _check_split(self, name: str, level: _Level) -> None:
        """Refuse a restored split that this sampler would not have made for ``level.n``
        samples: ``perm`` a permutation of them, ``order`` one of this sampler's
        ``count(name, n)`` batches (with this class's epochs: a permutation of them),
        ``position`` within the epoch."""
        n, count = level.n, self.count(name, level.n) if level.n >= 1 else 0
        if n < 1 or level.perm.shape != (n,) or not _is_permutation(level.perm):
            raise ValueError(
                f"the Sampler state's {name} split is not a permutation of its {n} samples "
                f"(perm of shape {tuple(level.perm.shape)}): the file is damaged or was not "
                "written by Sampler.state_dict(). Restore it from a copy, or start a new run."
            )
        order, size = level.order, self.batch_sizes[name]
        # this class's epochs are permutations of the batches; a subclass that replaces draw
        # or split may keep any epoch of them
        own = type(self).draw is Sampler.draw and type(self).split is Sampler.split
        if own and (order.numel() != count or not _is_permutation(order)):
            raise ValueError(
                f"the Sampler state splits the {name} data ({n} samples) into {order.numel()} "
                f"fixed batches, but this sampler's {name} batch size ({size}) splits it into "
                f"{count}: restored, it would draw batches that do not exist here (empty or "
                "partial ones). Load it into a Sampler with the batch sizes it was saved with "
                "(its checkpoint's settings), or start a new run."
            )
        if order.ndim != 1 or not bool(((order >= 0) & (order < count)).all()):
            raise ValueError(
                f"the Sampler state's {name} epoch draws batches outside 0 .. {count - 1}, the "
                f"{count} fixed batches this sampler's {name} batch size ({size}) splits its {n} "
                "samples into: restored, it would draw batches that do not exist here (empty or "
                "partial ones). Load it into a sampler with the batch sizes it was saved with "
                "(its checkpoint's settings), or start a new run."
            )
        end = count if own else order.numel()
        if not 0 <= level.position <= end:
            raise ValueError(
                f"the Sampler state's {name} epoch position is {level.position}, outside "
                f"[0, {end}] (its epoch's {end} batches): the file is damaged or was not "
                "written by Sampler.state_dict(). Restore it from a copy, or start a new run."
            )


def _is_permutation(values: torch.Tensor) -> bool:
    """Whether a 1-d tensor holds each of ``0 .. len - 1`` once."""
    return values.ndim == 1 and torch.equal(
        values.sort().values, torch.arange(values.numel(), dtype=values.dtype)
    )


def _check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"level must be 'train' or 'val', got {level!r}.")
    return level

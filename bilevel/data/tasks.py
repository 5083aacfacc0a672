"""Reproducible N-way K-shot few-shot tasks and meta-batches.

Task ``i`` of a ``TaskSampler`` depends only on ``(seed, i)``, and meta-batch ``s`` holds
tasks ``s * B`` to ``s * B + B - 1``, so a training run that restarts at step ``s`` sees
exactly the batches it would have seen without the interruption, whatever the number of
``DataLoader`` workers.

Batches use torchmeta's layout (Deleu et al. 2019, "Torchmeta: A Meta-Learning library
for PyTorch")::

    {"train": (x, y), "test": (x, y)}

with ``x`` float32 ``[B, N*K, C, H, W]`` and ``y`` int64 ``[B, N*K]`` for the support
("train") set, and ``N*Q`` examples for the query ("test") set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

__all__ = ["Task", "TaskDataset", "TaskSampler", "collate_tasks", "meta_batches"]

Task = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""A task or meta-batch: ``{"train": (x, y), "test": (x, y)}``."""


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _seed_sequence(seed: int, index: int) -> np.random.SeedSequence | list[int]:
    """The entropy of task ``index``: ``[seed, index]`` when both fit in 32 bits (the streams
    of earlier versions), else ``SeedSequence(seed, spawn_key=(index,))``. NumPy splits
    integers into 32-bit words and pads short entropy with zeros, so ``[seed, index]`` for a
    larger seed repeated other seeds' tasks: ``[2**32 + s, 0]`` is ``[s, 1, 0]``, the same
    stream as ``[s, 1]`` (seed ``s``, task 1)."""
    if seed < 2**32 and index < 2**32:
        return [seed, index]
    return np.random.SeedSequence(seed, spawn_key=(index,))


class TaskSampler:
    """Samples N-way K-shot tasks with Q query examples per class.

    Task ``index`` is drawn with ``numpy.random.default_rng([seed, index])`` (for a seed or
    index of 2**32 or more, ``SeedSequence(seed, spawn_key=(index,))``): ``ways``
    distinct classes in random order (class ``classes[j]`` gets label ``j``, so the label
    assignment is a random permutation), then ``shots + queries`` distinct examples of
    each class, the first ``shots`` for the support set and the rest for the query set.
    Support and query thus hold the same classes and never the same example. (Omniglot has
    one pair of drawings with identical pixels, ``Braille/character01`` drawings 03 and 19,
    in the meta-training split: about 1 task in 4,400 at 5-way 1-shot with 15 queries shows
    the same image in support and query; the data are kept as released.) Within each set,
    examples are ordered by label (``y = [0]*K + [1]*K + ...``).

    The same ``(seed, index)`` gives the same task in any process; across NumPy versions
    this relies on NumPy keeping ``Generator.choice`` and ``Generator.random`` streams.

    Args:
        images: Array-like ``[n_classes, n_per_class, H, W]`` (or ``[..., C, H, W]``),
            NumPy or torch, or an object with such an ``images`` attribute (e.g.
            ``OmniglotSplit``). ``uint8`` data is scaled to ``[0, 1]``; floating data is
            used as is (cast to float32).
        ways: Classes per task (N).
        shots: Support examples per class (K).
        queries: Query examples per class (Q).
        seed: Non-negative seed; with the task index it fixes each task.
    """

    def __init__(self, images: Any, ways: int, shots: int, queries: int, seed: int = 0) -> None:
        data = getattr(images, "images", images)
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().numpy()
        data = np.asarray(data)
        if data.ndim == 4:
            data = data[:, :, None]
        if data.ndim != 5:
            raise ValueError(
                "images must have shape [n_classes, n_per_class, H, W] or "
                f"[n_classes, n_per_class, C, H, W], got {tuple(data.shape)}"
            )
        if data.dtype != np.uint8 and not np.issubdtype(data.dtype, np.floating):
            raise ValueError(f"images must be uint8 or floating, got {data.dtype}")
        self.ways = _check_int("ways", ways, 1)
        self.shots = _check_int("shots", shots, 1)
        self.queries = _check_int("queries", queries, 1)
        self.seed = _check_int("seed", seed, 0)
        n_classes, n_per_class = data.shape[:2]
        # an OmniglotSplit says which split it is: the one too small is named
        name = getattr(images, "name", None)
        where = f"the {name!r} split" if isinstance(name, str) else "images"
        if self.ways > n_classes:
            raise ValueError(f"ways={ways} is more than the {n_classes} classes in {where}")
        if self.shots + self.queries > n_per_class:
            raise ValueError(
                f"shots + queries = {self.shots + self.queries} is more than the "
                f"{n_per_class} examples per class in {where}"
            )
        self.data = data
        self.n_classes = int(n_classes)
        self.n_per_class = int(n_per_class)

    def task_indices(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The classes and examples of task ``index``.

        Args:
            index: Non-negative task index.

        Returns:
            ``(classes, examples)``: ``classes[j]`` is the class with label ``j`` (shape
            ``[N]``); ``examples[j]`` are its example indices (shape ``[N, K + Q]``), the
            first ``K`` for the support set.
        """
        index = _check_int("index", index, 0)
        rng = np.random.default_rng(_seed_sequence(self.seed, index))
        classes = rng.choice(self.n_classes, size=self.ways, replace=False)
        keys = rng.random((self.ways, self.n_per_class))
        examples = np.argsort(keys, axis=1, kind="stable")[:, : self.shots + self.queries]
        return classes.astype(np.int64), examples.astype(np.int64)

    def _to_float(self, x: np.ndarray) -> torch.Tensor:
        if x.dtype == np.uint8:
            return torch.from_numpy(x.astype(np.float32) / np.float32(255))
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def task(self, index: int) -> Task:
        """Task ``index``, without a leading task dimension.

        Args:
            index: Non-negative task index.

        Returns:
            ``{"train": (x, y), "test": (x, y)}`` with ``x`` float32 ``[N*K, C, H, W]``,
            ``y`` int64 ``[N*K]`` in ``0..N-1`` (``N*Q`` for ``"test"``).
        """
        classes, examples = self.task_indices(index)
        x = self.data[classes[:, None], examples]  # [N, K+Q, C, H, W]
        k = self.shots
        shape = x.shape[2:]
        labels = np.arange(self.ways, dtype=np.int64)
        return {
            "train": (
                self._to_float(x[:, :k].reshape(-1, *shape)),
                torch.from_numpy(np.repeat(labels, k)),
            ),
            "test": (
                self._to_float(x[:, k:].reshape(-1, *shape)),
                torch.from_numpy(np.repeat(labels, self.queries)),
            ),
        }

    def batch(self, step: int, batch_size: int) -> Task:
        """Meta-batch ``step``: tasks ``step * batch_size`` up to ``(step + 1) * batch_size - 1``.

        Args:
            step: Non-negative step (batch) index.
            batch_size: Tasks per meta-batch.

        Returns:
            The tasks stacked along a leading dimension (see ``collate_tasks``).
        """
        step = _check_int("step", step, 0)
        batch_size = _check_int("batch_size", batch_size, 1)
        first = step * batch_size
        return collate_tasks([self.task(first + i) for i in range(batch_size)])


def collate_tasks(tasks: Sequence[Task]) -> Task:
    """Stack tasks into a meta-batch (a ``collate_fn`` for ``DataLoader``).

    Args:
        tasks: Tasks as returned by ``TaskSampler.task``.

    Returns:
        ``{"train": (x, y), "test": (x, y)}`` with a leading task dimension.
    """
    if not tasks:
        raise ValueError("tasks must hold at least one task")
    return {
        key: (
            torch.stack([t[key][0] for t in tasks]),
            torch.stack([t[key][1] for t in tasks]),
        )
        for key in ("train", "test")
    }


class TaskDataset(Dataset):
    """Map-style dataset whose item ``i`` is task ``start + i`` of a sampler.

    Use with ``DataLoader(dataset, batch_size=B, collate_fn=collate_tasks)`` and without
    shuffling: batch ``s`` then equals ``sampler.batch(start // B + s, B)`` when ``start``
    is a multiple of ``B``, for any number of workers.

    Args:
        sampler: The task sampler.
        num_tasks: Number of tasks (the dataset length).
        start: Index of the first task.
    """

    def __init__(self, sampler: TaskSampler, num_tasks: int, start: int = 0) -> None:
        self.sampler = sampler
        self.num_tasks = _check_int("num_tasks", num_tasks, 0)
        self.start = _check_int("start", start, 0)

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, i: int) -> Task:
        if not -self.num_tasks <= i < self.num_tasks:
            raise IndexError(f"task {i} out of range for {self.num_tasks} tasks")
        return self.sampler.task(self.start + i % self.num_tasks)


class _BatchStream(IterableDataset):
    """Meta-batches ``start, start + 1, ...``; worker ``w`` of ``n`` makes every ``n``-th."""

    def __init__(self, sampler: TaskSampler, batch_size: int, start: int, stop: int | None):
        self.sampler = sampler
        self.batch_size = batch_size
        self.start = start
        self.stop = stop

    def __iter__(self) -> Iterator[Task]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start + worker
        while self.stop is None or step < self.stop:
            yield self.sampler.batch(step, self.batch_size)
            step += n_workers


def meta_batches(
    sampler: TaskSampler,
    batch_size: int,
    start: int = 0,
    stop: int | None = None,
    num_workers: int = 0,
    **loader_kwargs: Any,
) -> Iterator[Task]:
    """Iterate over meta-batches ``start, start + 1, ..., stop - 1`` in order.

    Batch ``s`` is always ``sampler.batch(s, batch_size)``, so resuming at ``start=s``
    continues an interrupted run exactly. With ``num_workers > 0`` batches are built in
    ``DataLoader`` worker processes (worker ``w`` builds batches ``start + w``,
    ``start + w + num_workers``, ...; the loader returns them in order).

    Args:
        sampler: The task sampler.
        batch_size: Tasks per meta-batch.
        start: First step.
        stop: Step to stop before; ``None`` iterates forever.
        num_workers: ``DataLoader`` worker processes; 0 builds batches in this process.
        **loader_kwargs: Further ``DataLoader`` arguments (e.g. ``pin_memory``,
            ``prefetch_factor``, ``multiprocessing_context``).

    Yields:
        Meta-batches ``{"train": (x, y), "test": (x, y)}``.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    start = _check_int("start", start, 0)
    num_workers = _check_int("num_workers", num_workers, 0)
    if stop is not None:
        stop = _check_int("stop", stop, 0)
    if num_workers == 0:
        step = start
        while stop is None or step < stop:
            yield sampler.batch(step, batch_size)
            step += 1
        return
    stream = _BatchStream(sampler, batch_size, start, stop)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, **loader_kwargs)
    yield from loader

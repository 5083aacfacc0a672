"""Few-shot task sampler: shapes, labels, disjointness, reproducibility, DataLoader workers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bilevel.data import Omniglot, TaskDataset, TaskSampler, collate_tasks, meta_batches


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """30 classes x 20 examples of 6x5 uint8 images; each image holds its (class, example)."""
    data = np.zeros((30, 20, 6, 5), dtype=np.uint8)
    data[:, :, 0, 0] = np.arange(30)[:, None]
    data[:, :, 0, 1] = np.arange(20)[None, :]
    data[:, :, 1:] = np.random.default_rng(0).integers(0, 256, (30, 20, 5, 5))
    return data


def _ids(x: torch.Tensor) -> list[tuple[int, int]]:
    """(class, example) pairs encoded in a [..., 1, 6, 5] float batch."""
    codes = torch.round(x[..., 0, 0, :2] * 255).long().reshape(-1, 2)
    return [tuple(c) for c in codes.tolist()]


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k][i], b[k][i]) for k in ("train", "test") for i in (0, 1))


def test_task_shapes_and_labels(images: np.ndarray) -> None:
    sampler = TaskSampler(images, ways=5, shots=3, queries=4, seed=7)
    task = sampler.task(0)
    (xs, ys), (xq, yq) = task["train"], task["test"]
    assert xs.shape == (15, 1, 6, 5) and xs.dtype == torch.float32
    assert xq.shape == (20, 1, 6, 5) and yq.dtype == torch.int64
    assert ys.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert yq.tolist() == [j for j in range(5) for _ in range(4)]
    assert 0 <= xs.min() and xs.max() <= 1


def test_support_query_consistent(images: np.ndarray) -> None:
    sampler = TaskSampler(images, ways=5, shots=3, queries=4, seed=7)
    for index in range(50):
        task = sampler.task(index)
        classes, examples = sampler.task_indices(index)
        support, query = _ids(task["train"][0]), _ids(task["test"][0])
        # every example is where task_indices says; its label is its class's position
        for (cls, _), label in zip(support, task["train"][1].tolist(), strict=True):
            assert cls == classes[label]
        for (cls, _), label in zip(query, task["test"][1].tolist(), strict=True):
            assert cls == classes[label]
        assert {c for c, _ in support} == {c for c, _ in query} == set(classes.tolist())
        assert len(set(support) | set(query)) == 35  # never the same image twice
        expected = images[classes[:, None], examples].astype(np.float32) / 255
        got = torch.cat(
            [task["train"][0].reshape(5, 3, 6, 5), task["test"][0].reshape(5, 4, 6, 5)], 1
        )
        assert np.array_equal(got.numpy(), expected)


def test_reproducible(images: np.ndarray) -> None:
    a = TaskSampler(images, 5, 1, 5, seed=3)
    b = TaskSampler(torch.from_numpy(images), 5, 1, 5, seed=3)
    assert _equal(a.task(12), b.task(12))
    assert not _equal(a.task(12), a.task(13))
    assert not _equal(a.task(12), TaskSampler(images, 5, 1, 5, seed=4).task(12))
    # the label assignment is a random permutation, not sorted class ids
    firsts = [a.task_indices(i)[0] for i in range(20)]
    assert any((np.diff(c) < 0).any() for c in firsts)
    assert len({tuple(c) for c in firsts}) == 20


def test_batch_and_meta_batches(images: np.ndarray) -> None:
    sampler = TaskSampler(images, 4, 2, 3, seed=0)
    batch = sampler.batch(3, batch_size=6)
    assert batch["train"][0].shape == (6, 8, 1, 6, 5) and batch["train"][1].shape == (6, 8)
    assert batch["test"][0].shape == (6, 12, 1, 6, 5) and batch["test"][1].shape == (6, 12)
    assert _equal(batch, collate_tasks([sampler.task(18 + i) for i in range(6)]))
    # resuming at step 3 continues exactly
    stream = meta_batches(sampler, 6, start=3)
    assert _equal(next(stream), batch)
    assert _equal(next(stream), sampler.batch(4, 6))
    assert len(list(meta_batches(sampler, 6, start=2, stop=5))) == 3


def test_dataloader_workers(images: np.ndarray) -> None:
    sampler = TaskSampler(images, 5, 1, 2, seed=11)
    dataset = TaskDataset(sampler, num_tasks=20, start=8)
    serial = list(DataLoader(dataset, batch_size=4, collate_fn=collate_tasks))
    parallel = list(DataLoader(dataset, batch_size=4, collate_fn=collate_tasks, num_workers=2))
    assert len(serial) == len(parallel) == 5
    for step, (a, b) in enumerate(zip(serial, parallel, strict=True)):
        assert _equal(a, b) and _equal(a, sampler.batch(2 + step, 4))
    # the streaming iterator, finite (odd count: workers get unequal shares) and infinite
    expected = [sampler.batch(s, 4) for s in range(1, 8)]
    got = list(meta_batches(sampler, 4, start=1, stop=8, num_workers=2))
    assert len(got) == 7 and all(_equal(a, b) for a, b in zip(got, expected, strict=True))
    endless = itertools.islice(meta_batches(sampler, 4, start=1, num_workers=2), 5)
    assert all(_equal(a, b) for a, b in zip(endless, expected, strict=False))


def test_float_and_channel_input(images: np.ndarray) -> None:
    floats = images.astype(np.float64)[:, :, None] / 255  # [C, P, 1, H, W]
    a = TaskSampler(images, 3, 2, 2, seed=1).task(5)
    b = TaskSampler(floats, 3, 2, 2, seed=1).task(5)
    assert b["train"][0].dtype == torch.float32
    assert torch.allclose(a["train"][0], b["train"][0]) and torch.equal(a["test"][1], b["test"][1])


def test_bad_arguments(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="ways=31 is more than the 30 classes"):
        TaskSampler(images, 31, 1, 1)
    with pytest.raises(ValueError, match="shots \\+ queries = 21"):
        TaskSampler(images, 5, 10, 11)
    with pytest.raises(ValueError, match="shots must be an int >= 1"):
        TaskSampler(images, 5, 0, 1)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        TaskSampler(images, 5, 1, 1, seed=-1)
    with pytest.raises(ValueError, match="images must have shape"):
        TaskSampler(images[0], 5, 1, 1)
    with pytest.raises(ValueError, match="index must be"):
        TaskSampler(images, 5, 1, 1).task(-1)
    with pytest.raises(IndexError):
        TaskDataset(TaskSampler(images, 5, 1, 1), num_tasks=3)[3]


def test_omniglot_tasks(omniglot: Omniglot) -> None:
    split = omniglot.split("train")
    sampler = TaskSampler(split, ways=5, shots=1, queries=15, seed=0)
    batch = sampler.batch(0, batch_size=4)
    assert batch["train"][0].shape == (4, 5, 1, 28, 28)
    assert batch["test"][0].shape == (4, 75, 1, 28, 28)
    assert batch["train"][1].min() == 0 and batch["train"][1].max() == 4
    x = batch["test"][0]
    assert x.dtype == torch.float32 and x.min() == 0 and x.max() <= 1
    # the classes come from the train split only; compare images by (class, drawing) index
    for index in range(4):
        classes, examples = sampler.task_indices(index)
        chars = set(split.character_index[classes].tolist())
        assert chars <= set(omniglot.split_indices("train").tolist())
        assert all(len(set(row.tolist())) == 16 for row in examples)


def test_a_split_too_small_for_the_task_is_named() -> None:
    """Given an OmniglotSplit, the refusal names the split that is too small and its class
    count (it said "in images": an example samples three splits, and the user had to guess)."""
    from bilevel.data import OmniglotSplit

    n = 3
    split = OmniglotSplit(
        "val", np.zeros((n, 20, 2, 2), np.uint8), list("abc"), np.arange(n), np.zeros(n, int)
    )
    with pytest.raises(ValueError, match=r"ways=4 is more than the 3 classes in the 'val' split"):
        TaskSampler(split, 4, 1, 1)
    with pytest.raises(ValueError, match=r"20 examples per class in the 'val' split"):
        TaskSampler(split, 2, 5, 16)

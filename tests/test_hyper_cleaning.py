"""The data hyper-cleaning example: label corruption, F1, and a short run on real MNIST."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small problems run fastest on one thread (and do not fight other jobs for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hc() -> Iterator[ModuleType]:
    """The example module (it imports its sibling ``_common``, so examples/ goes on the path)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLES))
        import hyper_cleaning

        yield hyper_cleaning


def test_corrupt_labels_changes_exactly_half(hc: ModuleType) -> None:
    labels = torch.arange(1000) % 10
    noisy, corrupted = hc.corrupt_labels(labels, 0.5, 10, seed=3)
    assert corrupted.sum().item() == 500
    assert (noisy != labels).sum().item() == 500
    assert torch.equal(noisy != labels, corrupted)
    assert ((noisy >= 0) & (noisy < 10)).all()
    # every wrong class is used: the replacement is uniform over the 9 others
    shift = (noisy - labels)[corrupted] % 10
    assert set(shift.tolist()) == set(range(1, 10))


def test_corrupt_labels_is_reproducible(hc: ModuleType) -> None:
    labels = torch.randint(0, 10, (501,), generator=torch.Generator().manual_seed(0))
    a, mask_a = hc.corrupt_labels(labels, 0.5, 10, seed=7)
    b, mask_b = hc.corrupt_labels(labels, 0.5, 10, seed=7)
    _, mask_c = hc.corrupt_labels(labels, 0.5, 10, seed=8)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(mask_a, mask_c)
    assert mask_a.sum().item() == round(0.5 * 501)
    assert torch.equal(
        labels, torch.randint(0, 10, (501,), generator=torch.Generator().manual_seed(0))
    )
    with pytest.raises(ValueError, match="fraction"):
        hc.corrupt_labels(labels, 1.5, 10, seed=0)


def test_detection_scores(hc: ModuleType) -> None:
    corrupted = torch.tensor([True, True, False, False])
    flagged = torch.tensor([True, False, True, False])
    scores = hc.detection_scores(flagged, corrupted)
    assert scores == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert hc.detection_scores(corrupted, corrupted)["f1"] == 1.0
    assert hc.detection_scores(torch.zeros(4, dtype=torch.bool), corrupted)["f1"] == 0.0


# a short run: the implicit method says that its 50 LL steps leave the LL short of stationary
@pytest.mark.filterwarnings("ignore:The LL gradient:RuntimeWarning")
def test_short_run_on_mnist_separates_clean_from_corrupted(
    hc: ModuleType, data_root: Path, require_data, tmp_path: Path, one_thread: None
) -> None:
    require_data(data_root / "MNIST")
    out = tmp_path / "run"
    argv = [
        "--data-root", str(data_root), "--out", str(out), "--method", "implicit-cg",
        "--n-train", "500", "--n-val", "500", "--ll-steps", "50", "--final-steps", "100",
        "--ul-lr", "0.3", "--log-every", "2", "--no-progress",
    ]  # fmt: skip
    first = hc.main([*argv, "--ul-steps", "6"])
    gap = first["mean_weight_clean"] - first["mean_weight_corrupted"]
    assert gap > 0.2, first
    assert first["f1"] > 0.7, first
    saved = json.loads((out / "results.json").read_text())
    for key in ("test_acc", "f1", "ul_steps", "seconds", "settings", "hardware", "baseline"):
        assert key in saved
    assert saved["ul_steps"] == 6 and saved["method"] == "implicit-cg"
    assert (out / "weights_hist.png").stat().st_size > 0

    # the same command with more UL steps resumes from the checkpoint
    second = hc.main([*argv, "--ul-steps", "8"])
    assert second["resumed_from_step"] == 6 and second["ul_steps"] == 8
    assert [h["step"] for h in second["history"]] == [2, 4, 6, 8]
    with pytest.raises(SystemExit, match="other settings"):
        hc.main([*argv, "--ul-steps", "8", "--l2", "0.5"])

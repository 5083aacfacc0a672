"""The equilibrium-model example trains through the fixed-point adjoint on MNIST (a few
steps; the accuracy reported in the docs comes from the full run)."""

from __future__ import annotations

import json
from pathlib import Path

from example_modules import example_module


def test_a_few_implicit_steps_run_resume_and_report(data_root: Path, require_data, tmp_path):
    require_data(data_root / "MNIST")
    args = ["--data-root", str(data_root), "--out", str(tmp_path / "deq"), "--no-progress"]
    args += ["--hidden", "8", "--batch", "500", "--ll-steps", "8", "--adjoint-steps", "8"]
    with example_module("equilibrium_mnist") as example:
        first = example.main([*args, "--ul-steps", "3"])
        again = example.main([*args, "--ul-steps", "5"])  # resumes from the checkpoint
    saved = json.loads((tmp_path / "deq" / "results.json").read_text())
    assert first["ul_steps"] == 3 and again["ul_steps"] == 5 and saved["ul_steps"] == 5
    assert again["resumed_from_step"] == 3
    assert 0.0 <= saved["test_acc"] <= 1.0 and saved["method"] == "implicit"


def test_accuracy_counts_every_test_example_when_the_batch_does_not_divide_them():
    """The LL state has a fixed batch size; the last 10000 % batch test images were left out
    of the accuracy. Now a partial last batch is filled up and only its own rows count: the
    result equals evaluating every example on its own (each row's iteration is its own)."""
    import torch

    with example_module("equilibrium_mnist") as example:
        torch.manual_seed(0)
        model = example.Equilibrium(hidden=6, gamma=0.5).double()
        x = torch.randn(23, 784, dtype=torch.float64)
        y = torch.randint(0, 10, (23,))

        def fixed_point(batch):
            hidden = example.Hidden(batch, 6).double()
            return example.FixedPointMap(example.fixed_point_map, hidden, model, iters=30)

        batched = example.accuracy(fixed_point(5), model, x, y)  # 4 batches and 3 of 5
        alone = example.accuracy(fixed_point(1), model, x, y)
    assert batched == alone

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

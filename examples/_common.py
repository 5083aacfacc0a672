"""Small command-line helpers shared by the examples: output folder, resume, results.json.

Not part of the library: the examples import it as a sibling module.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from bilevel import checkpoint
from bilevel.data import load_mnist

DATASETS = {"mnist": "MNIST", "fashion": "FashionMNIST"}
PROGRESS_FILE = "progress.json"
CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_FILE = "results.json"
# arguments that may change between a run and its resume without changing the experiment
NOT_SETTINGS = ("out", "data_root", "device", "threads", "no_progress", "ul_steps")


def add_run_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Add ``--out``, ``--data-root``, ``--seed``, ``--device``, ``--threads``,
    ``--no-progress``."""
    parser.add_argument(
        "--out",
        default=default_out,
        help="output folder: results.json, checkpoint.pt (resumed when the same command is "
        "run again), plots (default: %(default)s)",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder holding MNIST/, FashionMNIST/ and omniglot/ (default: $BILEVEL_DATA)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (imported when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out a figure, write it to ``path`` (creating its folder) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def hardware(device: torch.device) -> str:
    """A one-line description of the machine a run used (for results tables)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{name}, {torch.get_num_threads()} thread(s)"
    return f"{name}; torch {torch.__version__}"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (:func:`bilevel.checkpoint.atomic_write`)."""
    checkpoint.atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The run's checkpoint, read without running code from it.

    Raises:
        bilevel.checkpoint.CheckpointError: the file is damaged, unsafe, from an older bilevel
            or not a training checkpoint (the message names it and says what to do).
    """
    return checkpoint.load(path, require=("step",))


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that define the experiment (what a resumed run must share)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}


class RunRecord:
    """Elapsed seconds and log history of a run, kept in ``OUT/progress.json`` so that they
    survive an interruption and resume together with ``OUT/checkpoint.pt``.

    A resumed run must have the same settings (:func:`settings_of`); otherwise this raises
    ``SystemExit`` rather than mixing two experiments in one folder.
    """

    def __init__(self, out: str | os.PathLike, settings: dict[str, Any]) -> None:
        self.out = Path(out)
        self.settings = settings
        self.checkpoint = self.out / CHECKPOINT_FILE
        self.path = self.out / PROGRESS_FILE
        self.previous_seconds = self.previous_cpu = 0.0
        self.seconds_at_checkpoint = self.cpu_at_checkpoint = 0.0
        self.history: list[dict[str, Any]] = []
        self.resumed_from = 0
        if self.checkpoint.exists():
            # read first: a damaged or unsafe file is reported as such, whatever progress.json
            step = read_checkpoint(self.checkpoint)["step"]
            saved = json.loads(self.path.read_text()) if self.path.exists() else {}
            if saved.get("settings") != settings:
                raise SystemExit(
                    f"{self.out} holds a run with other settings ({saved.get('settings')}); "
                    "use another --out, or delete that folder to start again."
                )
            self.resumed_from = int(step)
            self.previous_seconds = float(saved.get("seconds_at_checkpoint", 0.0))
            self.seconds_at_checkpoint = self.previous_seconds
            self.previous_cpu = float(saved.get("cpu_seconds_at_checkpoint", 0.0))
            self.cpu_at_checkpoint = self.previous_cpu
            self.history = [h for h in saved["history"] if h["step"] <= self.resumed_from]
        self.started = time.perf_counter()
        self.started_cpu = time.process_time()

    def start_clock(self) -> None:
        """Start timing now (call it just before the UL loop)."""
        self.started = time.perf_counter()
        self.started_cpu = time.process_time()

    @property
    def seconds(self) -> float:
        """Wall-clock seconds of the UL loop, summed over interrupted and resumed runs."""
        return self.previous_seconds + time.perf_counter() - self.started

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of this process in the UL loop (all threads), summed over resumes; on a
        shared machine a steadier measure of cost than wall-clock time."""
        return self.previous_cpu + time.process_time() - self.started_cpu

    def log(self, record: dict[str, Any], checkpointed: bool) -> None:
        """Append ``record`` (with the elapsed seconds) and save; ``checkpointed`` says that
        the runner saves a checkpoint at this step."""
        record = {
            **record,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
        }
        self.history.append(record)
        if checkpointed:
            self.seconds_at_checkpoint = record["seconds"]
            self.cpu_at_checkpoint = record["cpu_seconds"]
        saved = {
            "settings": self.settings,
            "seconds_at_checkpoint": self.seconds_at_checkpoint,
            "cpu_seconds_at_checkpoint": self.cpu_at_checkpoint,
        }
        write_json(self.path, {**saved, "history": self.history})


def mnist_split(
    root: str | None, dataset: str, n_train: int, n_val: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random train and validation subsets of the training set, and the test set;
    pixels in [0, 1], flattened, centered by the training subset's mean image."""
    images, labels = load_mnist(root, split="train", kind=DATASETS[dataset])
    test_images, test_labels = load_mnist(root, split="test", kind=DATASETS[dataset])
    if n_train + n_val > images.shape[0]:
        raise ValueError(f"n_train + n_val must be at most {images.shape[0]}.")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    x = images.flatten(1).float() / 255
    x_test = test_images.flatten(1).float() / 255
    train, val = order[:n_train], order[n_train : n_train + n_val]
    mean = x[train].mean(0)
    return {
        "train": (x[train] - mean, labels[train]),
        "val": (x[val] - mean, labels[val]),
        "test": (x_test - mean, test_labels),
    }


def start_run(args: Any, settings: dict[str, Any] | None = None) -> tuple[Any, Path, RunRecord]:
    """Apply ``--threads`` and open the run folder: ``(device, out, record)``.

    ``settings`` are what a resumed run must agree on (default: all the arguments).
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    record = RunRecord(out, settings_of(args) if settings is None else settings)
    return torch.device(args.device), out, record

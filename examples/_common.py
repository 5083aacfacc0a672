"""Small command-line helpers shared by the examples: the output folder (checked, locked,
resumed), signals, results.json, optional plots.

Not part of the library: the examples import it as a sibling module.

What a run with ``--out OUT`` guarantees (see :class:`Run`):

- ``OUT`` is created and a probe file is written there (atomically, then deleted) before any
  work: a read-only folder, a file in its place or a full disk are reported at once, with the
  folder's name;
- ``OUT/run.lock`` is locked (``fcntl.flock``) for as long as the run lasts: a second run on
  the same folder is refused with the first one's PID. The operating system releases the
  lock when the process ends, however it ends (a crash, SIGKILL): a stale lock is impossible;
- SIGTERM (what schedulers send before preemption) and SIGINT (Ctrl-C) during the UL loop
  save a checkpoint of the steps done at the end of the current step, then the process exits
  with status ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT); the same command
  resumes. Outside the loop (loading data, evaluating) it exits at once: nothing there would
  be lost. A second signal (SIGINT or SIGTERM) exits at once, the last checkpoint standing;
- a checkpoint is also written every ``--checkpoint-minutes`` (besides every N steps);
- a damaged or foreign ``checkpoint.pt`` or ``progress.json`` (or a checkpoint without its
  ``progress.json``) stops the run with a message that names the file and what to do, before
  any file is written;
- every file is written atomically (:func:`bilevel.checkpoint.atomic_write`), plots included:
  a full disk or a kill leaves the previous version, never a part of one;
- without matplotlib, plots are skipped (with a note): results.json, the checkpoint and the
  CSV are written all the same.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import platform
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

# the argparse types: defined in _argtypes.py (the benchmarks use them too), used here as
# _common.count, _common.positive, ...
from _argtypes import count, folder, nonnegative, positive, two_or_more  # noqa: F401

from bilevel import checkpoint
from bilevel.data import load_mnist, reword
from bilevel.ll import LowerLevelDivergenceError
from bilevel.problem import Interrupted
from bilevel.ul import HypergradientDivergenceError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not locked
    fcntl = None

DATASETS = {"mnist": "MNIST", "fashion": "FashionMNIST"}
PROGRESS_FILE = "progress.json"
CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_FILE = "results.json"
LOCK_FILE = "run.lock"
#: what every training checkpoint of the examples holds (BilevelProblem.state_dict)
CHECKPOINT_KEYS = ("ul_model", "ll_model", "step", "rng")
# arguments that may change between a run and its resume without changing the experiment
NOT_SETTINGS = (
    "out",
    "data_root",
    "download",
    "no_check_md5",
    "device",
    "threads",
    "no_progress",
    "ul_steps",
    "checkpoint_minutes",
)
#: the signals a run stops on, saving first; the exit status is 128 + the signal's number
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# a folder must have room for this much besides two checkpoints (the old stays until the new
# one is complete) and the logs
SPACE_MARGIN = 1 << 20


def add_run_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Add ``--out``, ``--data-root``, ``--seed``, ``--device``, ``--threads``,
    ``--no-progress``."""
    parser.add_argument(
        "--out",
        type=folder,
        default=default_out,
        help="output folder: results.json, checkpoint.pt (resumed when the same command is "
        "run again), progress.json, plots",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder holding MNIST/, FashionMNIST/ and omniglot/ (default: $BILEVEL_DATA)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="download the data files missing from the data folder from their public "
        "location, checking their md5 (needs an internet connection)",
    )
    parser.add_argument("--seed", type=seed, default=0, help="random seed of the run")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--threads", type=count, default=None, help="CPU threads (torch.set_num_threads)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_checkpoint_minutes(parser: argparse.ArgumentParser, default: float = 10.0) -> None:
    """Add ``--checkpoint-minutes``: a checkpoint at least this often, besides every N steps."""
    parser.add_argument(
        "--checkpoint-minutes",
        type=nonnegative,
        default=default,
        help="also write the checkpoint when this many minutes have passed since the last one "
        "(at the end of a UL step; 0: only every N steps), so that a kill loses at most that",
    )


def seed(text: str) -> int:
    """An argparse type: a random seed, an integer in [0, 2**64) (torch's and NumPy's range;
    the task samplers take no negative seed)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}")
    return value


# --- the data: loaded with the command line's options, failures named by them -------------

#: the options of the examples that cure what a data loader refuses, in the words of
#: bilevel.data.CURE_ARGUMENTS (whose "pass download=True" a command line cannot act on)
DATA_OPTIONS = {
    "root": "--data-root",
    "pass_root": "give --data-root",
    "default_root": "leave --data-root out",
    "download": "add --download",
    "no_check_md5": "add --no-check-md5",
    "cache_dir": "give --cache-dir",
}


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """The loaders' keyword arguments that ``--download`` and ``--no-check-md5`` set, those
    given only (the others stay at the loaders' defaults)."""
    options: dict[str, Any] = {}
    if args.download:
        options["download"] = True
    if getattr(args, "no_check_md5", False):
        options["check_md5"] = False
    return options


@contextlib.contextmanager
def loading_data() -> Iterator[None]:
    """Loading a data set (:mod:`bilevel.data`): an error whose message names the arguments
    that cure it (no data folder, missing or damaged files, an unknown md5) stops the run with
    that message, the cures named by this command line's options (:data:`DATA_OPTIONS`), and
    without a traceback; a warning of the kind is reworded too."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    except (OSError, ValueError) as error:
        message = reword(error, DATA_OPTIONS)
        if message == str(error):  # not a cure of the loaders'
            raise
        raise SystemExit(message) from None
    finally:
        for warning in caught:
            warnings.warn_explicit(
                reword(warning.message, DATA_OPTIONS),
                warning.category,
                warning.filename,
                warning.lineno,
            )


# --- plots: optional ---------------------------------------------------------------------

_warned_no_matplotlib = False


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``None`` (with a note, once)
    when matplotlib is not installed: plots are optional, the run's other files are not."""
    global _warned_no_matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        if not _warned_no_matplotlib:
            _warned_no_matplotlib = True
            print(
                f"note: no plots ({error}); install matplotlib to get them. The results, "
                "checkpoint and logs are written all the same.",
                file=sys.stderr,
            )
        return None
    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out a figure, write it to ``path`` atomically (creating its folder) and close it."""
    fig.tight_layout()
    fmt = path.suffix.lstrip(".") or "png"
    try:
        checkpoint.atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
    finally:
        pyplot().close(fig)


# --- small helpers -----------------------------------------------------------------------


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


def provenance() -> dict[str, Any]:
    """When and from which code a run's results were made: the date and the checkout's
    commit (``None`` outside a git checkout), with whether it had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    dirty = None if commit is None else bool(git("status", "--short", "--untracked-files=no"))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git": {"commit": commit, "dirty": dirty},
    }


def invocation(device: torch.device) -> dict[str, Any]:
    """What one invocation of a run ran on: hardware, threads, device, date and commit (kept
    in ``progress.json`` by :meth:`RunRecord.note_invocation`, so that the results of a run
    resumed elsewhere name every machine and checkout that made them)."""
    return {
        "hardware": hardware(device),
        "threads": torch.get_num_threads(),
        "device": str(device),
        **provenance(),
    }


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (:func:`bilevel.checkpoint.atomic_write`);
    a NaN or infinite number is written ``null`` (a mean over no features, no corrupted
    examples): JSON has no NaN, and strict readers (jq, JavaScript) refuse Python's."""
    text = json.dumps(_finite_or_null(obj), indent=2, allow_nan=False)
    checkpoint.atomic_write_text(path, text + "\n")


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    return obj


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The run's checkpoint (a :meth:`bilevel.BilevelProblem.state_dict`), read without
    running code from it.

    Raises:
        bilevel.checkpoint.CheckpointError: the file is damaged, unsafe, from an older bilevel
            or not a training checkpoint (the message names it and says what to do).
    """
    return checkpoint.load(path, require=CHECKPOINT_KEYS)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that define the experiment (what a resumed run must share)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}


#: the training images of MNIST and of Fashion-MNIST, of which --n-train and --n-val are
#: disjoint subsets
MNIST_TRAIN_IMAGES = 60000


def check_subsets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``--n-train`` + ``--n-val`` beyond the training set, with argparse's usage
    error (before the data is loaded)."""
    total = args.n_train + args.n_val
    if total > MNIST_TRAIN_IMAGES:
        parser.error(
            f"--n-train + --n-val is {total}: they are disjoint subsets of the "
            f"{MNIST_TRAIN_IMAGES} training images of {DATASETS[args.dataset]}; lower one of them."
        )


def add_mnist_md5_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--no-check-md5`` to an MNIST example (the files' md5 is checked by default)."""
    parser.add_argument(
        "--no-check-md5",
        action="store_true",
        help="use MNIST / Fashion-MNIST files whose md5 is not the official one (a copy of "
        "one's own)",
    )


def mnist_split(
    root: str | None,
    dataset: str,
    n_train: int,
    n_val: int,
    seed: int,
    download: bool = False,
    check_md5: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random train and validation subsets of the training set, and the test set;
    pixels in [0, 1], flattened, centered by the training subset's mean image. A file missing
    or damaged stops the run with the cure in the command line's options (:func:`loading_data`);
    ``download``: fetch the missing files (``--download``); ``check_md5``: refuse files that
    are not the official ones (off with ``--no-check-md5``)."""
    with loading_data():
        kind = DATASETS[dataset]
        options = {"kind": kind, "download": download, "check_md5": check_md5}
        images, labels = load_mnist(root, split="train", **options)
        test_images, test_labels = load_mnist(root, split="test", **options)
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


def stopped_by(
    error: FloatingPointError, method: str, step: int, ll_lr: str, alpha: str | None = None
) -> str:
    """What a run stopped by numerical trouble at UL step ``step`` says: the library's message
    and, where its cure names a library setting, the cure in the command line's flag: for a
    diverged LL (:class:`bilevel.ll.LowerLevelDivergenceError`, whose cure names ``lr``) the
    flag of the LL step, ``ll_lr``; for a diverged series
    (:class:`bilevel.ul.HypergradientDivergenceError` with a ``safe_alpha``) the flag of its
    step, ``alpha``."""
    message = f"{method} stopped at UL step {step}: {error}"
    if isinstance(error, LowerLevelDivergenceError):
        safe = error.safe_lr
        cure = f"{ll_lr} {safe:.3g} or less" if safe else f"halve {ll_lr} until the LL loss falls"
        message += f" On the command line: {cure}."
    elif isinstance(error, HypergradientDivergenceError) and alpha and error.safe_alpha:
        message += f" On the command line: {alpha} {error.safe_alpha:.3g}, or {alpha} auto."
    return message


def nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (through dicts, lists and tuples): about the size of a
    checkpoint of it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(nbytes(v) for v in obj)
    return 0


# --- the output folder: checked, locked ------------------------------------------------


def check_folder(out: Path) -> None:
    """Create ``out`` if needed and check that files can be written there: a probe file is
    written atomically (fsync included) and deleted.

    Raises:
        SystemExit: ``out`` is a file, cannot be created, is read-only or on a full disk (the
            message names it and says what to do).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SystemExit(
            f"--out {out} is a file, not a folder: give --out a folder (new or existing)."
        ) from None
    except OSError as error:
        raise SystemExit(
            f"cannot create the output folder --out {out} ({error.strerror or error}): check "
            "the path (a file in the way?) and its permissions, or choose another --out."
        ) from None
    probe = out / f".write-probe.{os.getpid()}"
    try:
        checkpoint.atomic_write_text(probe, "bilevel: checking that this folder is writable\n")
    except OSError as error:
        raise SystemExit(
            f"cannot write to the output folder {out} ({error.strerror or error}): "
            f"{_cure(error)}, or choose another --out."
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _cure(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space on its disk (or raise the quota)"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "make it writable"
    return "check the folder"


def check_space(out: Path, checkpoint_bytes: int) -> None:
    """Refuse to start when ``out``'s disk cannot hold two checkpoints of
    ``checkpoint_bytes`` (a save keeps the old one until the new one is complete) and a
    margin for the logs.

    Raises:
        SystemExit: too little free space (the message names the folder and the sizes).
    """
    try:
        free = shutil.disk_usage(out).free
    except OSError:  # cannot tell: the writes will say
        return
    needed = 2 * checkpoint_bytes + SPACE_MARGIN
    if free < needed:
        raise SystemExit(
            f"the output folder {out} has {free / 2**20:.1f} MiB free; this run's checkpoint "
            f"takes about {checkpoint_bytes / 2**20:.1f} MiB and a save needs room for two "
            f"(the old one stays until the new one is complete), {needed / 2**20:.1f} MiB "
            "with the logs. Free some space, or choose another --out."
        )


class FolderLock:
    """An exclusive lock on a run folder: ``fcntl.flock`` on ``FOLDER/run.lock``, which
    holds the PID and host of the process that has it.

    The operating system releases the lock when its holder ends, however it ends (SIGKILL
    too), so a lock cannot go stale; the file is left in place (deleting it would let two
    runs lock two different files). Without ``fcntl`` (not POSIX) nothing is locked.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            SystemExit: another process holds it (the message names the folder and the PID).
        """
        if fcntl is None:
            return
        # O_NOFOLLOW: the file is truncated and written; a symbolic link in its place (one
        # planted in a shared folder) would have this run overwrite the file it points to
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise SystemExit(
                    f"the lock file {self.path} is a symbolic link: this run would overwrite "
                    "the file it points to. Delete the link, or choose another --out."
                ) from None
            raise SystemExit(
                f"cannot create the lock file {self.path} ({error.strerror or error}): "
                f"{_cure(error)}, or choose another --out."
            ) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # (O_NOFOLLOW stops links
            # by name only) a hard link's target, or a FIFO or device, would be written to
            os.close(fd)
            kind = (
                "has other names (a hard link)"
                if stat.S_ISREG(info.st_mode)
                else "is not a regular file"
            )
            raise SystemExit(
                f"the lock file {self.path} {kind}: this run would overwrite another file "
                "through it. Delete it, or choose another --out."
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                print(
                    f"warning: cannot lock {self.path} ({error.strerror or error}); make sure "
                    "no other run writes to this folder.",
                    file=sys.stderr,
                )
                return
            who = "another process"
            if holder:
                who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "")
            raise SystemExit(
                f"the output folder {self.folder} is in use by another run ({who} holds "
                f"{self.path.name}): two runs in one folder would overwrite each other's "
                "checkpoint. Wait for that run to end (or stop it), or give this one another "
                "--out."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (also done by the operating system when the process ends)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


# --- signals -----------------------------------------------------------------------------


class Stopped(SystemExit):
    """The run stopped on a signal (SIGTERM, SIGINT): exit status ``128 + signal number``.
    ``message`` says what was saved and how to go on."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for ``signal.SIGTERM``, ..."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Signals:
    """SIGTERM and SIGINT handlers for the length of a run.

    Inside :meth:`deferred` (the UL loop), the first signal only sets :attr:`received`: the
    loop saves a checkpoint at the end of the current step and stops. Elsewhere, and for a
    second signal, the handler raises :class:`Stopped` at once. Handlers are installed only in
    the main thread (elsewhere Python does not deliver signals to them).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Install the handlers (remembering the previous ones)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back."""
        while self._previous:
            signum, handler = self._previous.popitem()
            # None: a handler installed from C, which Python cannot put back
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within: the first signal is acted on at a step boundary (see the class)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def _handle(self, signum: int, frame: Any) -> None:
        # no printing here: the signal may have interrupted a write to the same stream
        if self._deferring and self.received is None:
            self.received = signum
            return
        name = signal_name(signum)
        if self.received is not None:
            message = f"{name} again: stopped at once; the last checkpoint stands."
        else:
            message = (
                f"{name}: stopped outside the UL loop (there was nothing to save: the same "
                "command starts again from the last checkpoint, if there is one)."
            )
        raise Stopped(signum, message)


# --- progress.json -----------------------------------------------------------------------


def _progress_problem(path: Path, checkpoint_path: Path, what: str) -> NoReturn:
    raise SystemExit(
        f"{path} {what}. It holds the settings, log and timings of the run whose checkpoint is "
        f"{checkpoint_path.name}, beside it. Restore it from a copy to resume that run; or start "
        f"again: delete {checkpoint_path.name} and {path.name} from {path.parent} (or choose "
        "another --out). Nothing was written."
    )


def read_progress(path: Path, checkpoint_path: Path) -> dict[str, Any]:
    """``progress.json`` of a run that has a checkpoint, checked.

    Raises:
        SystemExit: it is missing, empty, unreadable, truncated or corrupted JSON, or not the
            progress file of an example (the message names it and what to do).
    """
    if not path.exists():
        _progress_problem(
            path,
            checkpoint_path,
            f"is missing, though {checkpoint_path.name} is there (deleted, or the checkpoint "
            "was copied alone)",
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        _progress_problem(path, checkpoint_path, "is not text: it is corrupted")
    except OSError as error:
        _progress_problem(path, checkpoint_path, f"cannot be read ({error.strerror or error})")
    if not text.strip():
        _progress_problem(path, checkpoint_path, "is empty (0 bytes of JSON)")
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as error:
        _progress_problem(
            path, checkpoint_path, f"is truncated or corrupted (not valid JSON: {error})"
        )
    history = saved.get("history") if isinstance(saved, dict) else None
    valid = (
        isinstance(saved, dict)
        and isinstance(saved.get("settings"), dict)
        and isinstance(history, list)
        and all(isinstance(h, dict) and type(h.get("step")) is int for h in history)
        and all(
            type(saved.get(k, 0.0)) in (int, float)
            for k in ("seconds_at_checkpoint", "cpu_seconds_at_checkpoint")
        )
        and isinstance(saved.get("invocations", []), list)
        and all(isinstance(i, dict) for i in saved.get("invocations", []))
    )
    if not valid:
        _progress_problem(
            path,
            checkpoint_path,
            "is JSON but not the progress file of an example run (it needs 'settings', "
            "'history' with a 'step' in each record, the seconds at the checkpoint, and "
            "'invocations' as a list of records)",
        )
    return saved


class RunRecord:
    """Elapsed seconds and log history of a run, kept in ``OUT/progress.json`` so that they
    survive an interruption and resume together with ``OUT/checkpoint.pt``.

    A resumed run must have the same settings (:func:`settings_of`); otherwise this raises
    ``SystemExit`` rather than mixing two experiments in one folder. Nothing is written here:
    see :meth:`begin`, :meth:`log` and :meth:`mark_checkpoint`.

    Raises:
        bilevel.checkpoint.CheckpointError: ``checkpoint.pt`` is damaged, unsafe or foreign.
        SystemExit: ``progress.json`` is missing beside a checkpoint, damaged or foreign, or
            holds a run with other settings.
    """

    def __init__(self, out: str | os.PathLike, settings: dict[str, Any]) -> None:
        self.out = Path(out)
        self.settings = settings
        self.checkpoint = self.out / CHECKPOINT_FILE
        self.path = self.out / PROGRESS_FILE
        self.previous_seconds = self.previous_cpu = 0.0
        self.seconds_at_checkpoint = self.cpu_at_checkpoint = 0.0
        self.history: list[dict[str, Any]] = []
        self.invocations: list[dict[str, Any]] = []
        self.resumed_from = 0
        if self.checkpoint.exists():
            # read first: a damaged or unsafe file is reported as such, whatever progress.json
            step = read_checkpoint(self.checkpoint)["step"]
            saved = read_progress(self.path, self.checkpoint)
            if saved["settings"] != settings:
                keys = sorted({*saved["settings"], *settings})
                changed = [k for k in keys if saved["settings"].get(k) != settings.get(k)]
                details = ", ".join(
                    f"{k}: {saved['settings'].get(k)!r} there, {settings.get(k)!r} now"
                    for k in changed
                )
                raise SystemExit(
                    f"{self.out} holds a run with other settings ({details}); use another "
                    "--out, or delete that folder to start again."
                )
            self.resumed_from = int(step)
            self.previous_seconds = float(saved.get("seconds_at_checkpoint", 0.0))
            self.seconds_at_checkpoint = self.previous_seconds
            self.previous_cpu = float(saved.get("cpu_seconds_at_checkpoint", 0.0))
            self.cpu_at_checkpoint = self.previous_cpu
            self.history = [h for h in saved["history"] if h["step"] <= self.resumed_from]
            # the invocations whose steps the checkpoint holds (one that saved none is dropped)
            self.invocations = [
                i
                for i in saved.get("invocations", [])
                if isinstance(i, dict) and i.get("from_step", 0) < self.resumed_from
            ]
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

    def note_invocation(self, info: dict[str, Any]) -> None:
        """Record this invocation (``info``: see :func:`invocation`), from the step it resumes
        at; saved with the next checkpoint's progress."""
        self.invocations.append({"from_step": self.resumed_from, **info})

    def account(self, step: int) -> dict[str, Any]:
        """What ``results.json`` says of the invocations that made the model of UL step
        ``step`` (the one evaluated):

        - ``resumed_from_step``: the step this invocation resumed training at (0: a fresh
          run), ``None`` for a re-evaluation;
        - ``reevaluation``: whether this invocation took no step on a run that had taken some
          (the same command run again on a finished run, or on one whose budget is spent,
          only evaluates its model again);
        - ``invocations``: the machine and code of each invocation that trained the model,
          from the step it resumed at (a re-evaluation is not one of them: the results' own
          ``hardware``, ``date`` and ``git`` name it).
        """
        reevaluation = 0 < self.resumed_from == step
        return {
            "resumed_from_step": None if reevaluation else self.resumed_from,
            "reevaluation": reevaluation,
            "invocations": [i for i in self.invocations if i.get("from_step", 0) < step]
            if reevaluation
            else self.invocations,
        }

    def begin(self) -> None:
        """Write ``progress.json`` of a fresh run (a checkpoint never goes without one)."""
        if not self.checkpoint.exists():
            self._write()

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
        self._write()

    def mark_checkpoint(self) -> None:
        """A checkpoint was just written (between log records): record the elapsed time."""
        self.seconds_at_checkpoint = round(self.seconds, 3)
        self.cpu_at_checkpoint = round(self.cpu_seconds, 3)
        self._write()

    def _write(self) -> None:
        saved = {
            "settings": self.settings,
            "seconds_at_checkpoint": self.seconds_at_checkpoint,
            "cpu_seconds_at_checkpoint": self.cpu_at_checkpoint,
            "invocations": self.invocations,
        }
        write_json(self.path, {**saved, "history": self.history})


def start_run(args: Any, settings: dict[str, Any] | None = None) -> tuple[Any, Path, RunRecord]:
    """Apply ``--threads``, check the output folder and read what a previous run left:
    ``(device, out, record)``. ``settings`` are what a resumed run must agree on (default:
    all the arguments).

    The older, smaller form of :class:`Run`: no lock and no signal handling (use
    ``with Run(...) as run`` for those).
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    check_folder(out)
    try:
        record = RunRecord(out, settings_of(args) if settings is None else settings)
    except checkpoint.CheckpointError as error:
        raise SystemExit(str(error)) from None
    record.begin()
    return torch.device(args.device), out, record


# --- one run -----------------------------------------------------------------------------


class Run:
    """One invocation of an example on its output folder: a context manager.

    On entry: apply ``--threads``; create and check ``out`` (:func:`check_folder`), lock it
    (:class:`FolderLock`), read what a previous run left (:class:`RunRecord`; a damaged file
    stops here, before anything is written), write ``progress.json`` of a fresh run, and
    install the SIGTERM/SIGINT handlers (:class:`Signals`). On exit: restore the handlers,
    release the lock, print what a signal stop saved, and turn a failed write into the run's
    folder (a full disk) into a message that names it.

    ``out=None`` (the quickstart without ``--out``): no folder, nothing saved; a signal ends
    the run at once. Under ``torch.distributed``, only the main process (``main=True``)
    checks, locks and writes; every process handles signals.

    Args:
        out: the output folder, or ``None``.
        settings: what a resumed run must agree on (see :func:`settings_of`).
        checkpoint_minutes: write a checkpoint when this many minutes have passed since the
            last one (``None`` or 0: only the runner's every-N-steps checkpoints).
        threads: ``torch.set_num_threads`` (``None``: leave it).
        main: this process writes the folder (rank 0).
        steps: the UL steps asked for: a checkpoint that holds as many is said to be evaluated
            again, not resumed (``None``: not said).
    """

    def __init__(
        self,
        out: str | os.PathLike | None,
        settings: dict[str, Any],
        checkpoint_minutes: float | None = None,
        threads: int | None = None,
        main: bool = True,
        steps: int | None = None,
    ) -> None:
        self.out = None if out is None else Path(out)
        self.settings = settings
        self.steps_wanted = steps
        self.checkpoint_seconds = 60.0 * checkpoint_minutes if checkpoint_minutes else None
        self.threads = threads
        self.main = main
        self.signals = Signals()
        self.lock: FolderLock | None = None
        self.record: RunRecord | None = None
        self._last_save = time.monotonic()

    def __enter__(self) -> Run:
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            if self.out is not None:
                if self.main:
                    check_folder(self.out)
                    self.lock = FolderLock(self.out)
                    self.lock.acquire()
                try:
                    self.record = RunRecord(self.out, self.settings)
                except checkpoint.CheckpointError as error:
                    raise SystemExit(str(error)) from None
                if self.main:
                    self.record.begin()
                    if self.record.resumed_from:  # (said also with --no-progress)
                        print(self._resuming(self.record.resumed_from), flush=True)
            self.signals.install()
        except BaseException:
            self._close()
            raise
        self._last_save = time.monotonic()
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        self._close()
        if isinstance(error, Stopped) and error.message:
            print(error.message, file=sys.stderr, flush=True)
        elif isinstance(error, checkpoint.CheckpointError):
            raise SystemExit(str(error)) from None
        elif isinstance(error, OSError) and self._failed_write(error):
            raise SystemExit(
                f"writing the run's files in {self.out} failed ({error.strerror or error}): "
                f"{_cure(error)}, then run the same command to resume. Every file there is "
                "whole (each is written atomically: a failed save leaves the previous one), "
                f"so the last checkpoint{self._saved_step()} stands."
            ) from error
        return False

    def _resuming(self, step: int) -> str:
        if self.steps_wanted is not None and step >= self.steps_wanted:
            return (
                f"the run in {self.out} is finished ({self.record.checkpoint.name} holds UL "
                f"step {step}, of {self.steps_wanted} asked for): evaluating it again, no "
                "step taken"
            )
        return f"resuming from UL step {step} ({self.record.checkpoint})"

    def _close(self) -> None:
        self.signals.restore()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _failed_write(self, error: OSError) -> bool:
        if self.out is None or not self.main:
            return False
        if error.filename is not None:
            try:
                Path(error.filename).resolve().relative_to(self.out.resolve())
            except (ValueError, OSError):
                return False
            return True
        return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

    def _saved_step(self) -> str:
        try:
            return f" (UL step {int(read_checkpoint(self.out / CHECKPOINT_FILE)['step'])})"
        except (checkpoint.CheckpointError, OSError):
            return ""

    # --- the UL loop ---

    @contextlib.contextmanager
    def loop(self) -> Iterator[None]:
        """The UL loop: a signal is acted on at the next step boundary (see :class:`Signals`).
        Also starts the record's clock."""
        if self.record is not None:
            self.record.start_clock()
        self._last_save = time.monotonic()
        with self.signals.deferred():
            yield

    @property
    def stop_requested(self) -> bool:
        """Whether a SIGTERM or SIGINT arrived during the UL loop."""
        return self.signals.received is not None

    def checkpoint_due(self) -> bool:
        """Whether ``checkpoint_minutes`` have passed since the last checkpoint."""
        if self.checkpoint_seconds is None or self.out is None:
            return False
        return time.monotonic() - self._last_save >= self.checkpoint_seconds

    def checkpointed(self) -> None:
        """A checkpoint was written now: restart the ``checkpoint_minutes`` clock."""
        self._last_save = time.monotonic()

    def reserve(self, state: dict[str, Any]) -> None:
        """Check the disk has room for checkpoints of ``state`` (:func:`check_space`)."""
        if self.out is not None and self.main:
            check_space(self.out, nbytes(state))

    def stop(self, step: int) -> NoReturn:
        """Stop after a signal, once the checkpoint of ``step`` steps is written (or with
        nothing to save, without ``--out``): raise :class:`Stopped`."""
        signum = self.signals.received or signal.SIGTERM
        name = signal_name(signum)
        if self.out is None:
            message = (
                f"{name}: stopped after UL step {step}; nothing saved (no --out: give one to "
                "keep a checkpoint that the same command resumes)."
            )
        else:
            message = (
                f"{name}: stopped after UL step {step}; the checkpoint of the steps done is "
                f"saved in {self.out / CHECKPOINT_FILE}. Run the same command to resume."
            )
        raise Stopped(signum, message if self.main else "")

    def run_problem(
        self,
        problem: Any,
        data: Callable[[int], Any],
        steps: int,
        stop: tuple[str, ...] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | None:
        """``problem.run(data, steps, checkpoint=OUT/checkpoint.pt, **kwargs)`` as the UL
        loop of this run: resumed from the checkpoint, saved every ``checkpoint_minutes``
        too, stopped (after saving) by SIGTERM or SIGINT (:class:`Stopped`). With ``stop``,
        ``(method, LL step flag[, series step flag])``, numerical trouble (a diverged LL or
        solve) ends the script with :func:`stopped_by`'s message instead of a traceback.

        A runner that handles the signals itself (it installs its handlers for the length of
        ``run``, saves after the step under way and raises ``bilevel.Interrupted`` for
        SIGTERM or ``KeyboardInterrupt`` for SIGINT) is met half-way: its stop becomes this
        run's :class:`Stopped`, with ``progress.json`` brought up to date."""
        path = None if self.record is None else self.record.checkpoint
        if self.record is not None:  # a run finished past the steps asked for: no step taken,
            steps = max(steps, self.record.resumed_from)  # its model evaluated again
        with self.loop():
            try:
                last = problem.run(self.steps(data, problem), steps, checkpoint=path, **kwargs)
            except Stopped:
                raise
            except FloatingPointError as error:
                if stop is None:
                    raise
                method, *flags = stop
                message = stopped_by(error, method, problem.step_count, *flags)
                raise SystemExit(message) from error
            except (KeyboardInterrupt, SystemExit) as error:
                signum = signal.SIGINT if isinstance(error, KeyboardInterrupt) else None
                signum = getattr(error, "signal", signum)
                if signum is None:  # not a stop on a signal
                    raise
                self._stopped_by_runner(signum, problem, error)
        if self.stop_requested:  # during the last step, which the runner saved
            self.stop(problem.step_count)
        return last

    def _stopped_by_runner(self, signum: int, problem: Any, error: BaseException) -> NoReturn:
        saved = None
        if self.record is not None and self.main:
            with contextlib.suppress(checkpoint.CheckpointError, OSError):
                saved = int(read_checkpoint(self.record.checkpoint)["step"])
        name = signal_name(signum)
        if saved is not None and saved == problem.step_count:
            self.record.mark_checkpoint()
            message = (
                f"{name}: stopped after UL step {saved}; the checkpoint of the steps done is "
                f"saved in {self.record.checkpoint}. Run the same command to resume."
            )
        elif saved is not None:
            message = f"{name}: stopped at once; the last checkpoint (UL step {saved}) stands."
        else:
            message = f"{name}: stopped after UL step {problem.step_count}; nothing saved."
        if isinstance(error, Interrupted):  # the runner said it already
            message = ""
        raise Stopped(signum, message) from None

    def steps(self, data: Callable[[int], Any], problem: Any) -> Callable[[int], Any]:
        """``data`` for :meth:`bilevel.BilevelProblem.run` (a function ``step -> batch``),
        with the step boundary's duties: after a signal, save the checkpoint and stop; when
        ``checkpoint_minutes`` have passed, save. The runner asks for the batch of step ``i``
        once ``i`` steps are done and saved or logged: the checkpoint written here is the
        one the runner would write after step ``i``."""

        started: list[int] = []  # the step this invocation starts at (after the resume)

        def batch(step: int) -> Any:
            if not started:
                started.append(step)
            save = self.stop_requested or self.checkpoint_due()
            if save and step != started[0] and self.out is not None and self.main:
                problem.save_checkpoint(self.record.checkpoint)
                self.record.mark_checkpoint()
                self.checkpointed()
            if self.stop_requested:
                self.stop(problem.step_count)
            return data(step)

        return batch

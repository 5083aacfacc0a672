"""bilevel.checkpoint: loading a file never runs code; real checkpoints round-trip bitwise;
damaged or foreign files give a CheckpointError that names them; the atomic writer."""

from __future__ import annotations

import json
import os
import pickle
import random
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from example_modules import example_module
from problems import ridge, ridge_ll, ridge_ul

from bilevel import BilevelProblem, checkpoint
from bilevel.checkpoint import CheckpointError
from bilevel.ll import GradientDescent
from bilevel.ul import Implicit

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LEGACY = "_use_new_zipfile_serialization"


def make(p, lr=0.05):
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=20)
    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.5, k=5)
    return BilevelProblem(ll, ul, torch.optim.Adam(p.ul_model.parameters(), lr=lr))


def batch(p):
    """Random minibatches drawn from torch, NumPy and Python's ``random``: an exact resume
    needs all three generators restored."""

    def draw(step):
        idx = torch.cat(
            [
                torch.randint(0, 60, (20,)),
                torch.from_numpy(np.random.randint(0, 60, 5)),
                torch.tensor([random.randrange(60) for _ in range(5)]),
            ]
        )
        return (p.train[0][idx], p.train[1][idx]), p.val

    return draw


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(scope="module")
def common():
    """examples/_common.py (the examples' checkpoint loader)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import _common

        yield _common
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def omniglot_example(common):
    """examples/omniglot.py as a module (its best.pt reader)."""
    with example_module("omniglot") as module:
        yield module


# --- every loader ------------------------------------------------------------------------


def _load_checkpoint(path):
    make(ridge()).load_checkpoint(path)


def _problem_run(path):
    p = ridge()
    make(p).run(lambda step: (p.train, p.val), steps=2, checkpoint=path, progress=False)


def _run_record(common, path):
    """The examples' resume: ``RunRecord`` on a folder holding ``path`` as checkpoint.pt,
    with a progress.json of the same settings (so that only the checkpoint can stop it)."""
    out = path.parent / "run"
    out.mkdir(exist_ok=True)
    (out / common.CHECKPOINT_FILE).write_bytes(path.read_bytes())
    (out / common.PROGRESS_FILE).write_text(json.dumps({"settings": {"a": 1}, "history": []}))
    common.RunRecord(out, {"a": 1})


LOADERS = {
    "checkpoint.load": lambda path, common, omniglot: checkpoint.load(path),
    "BilevelProblem.load_checkpoint": lambda path, common, omniglot: _load_checkpoint(path),
    "BilevelProblem.run": lambda path, common, omniglot: _problem_run(path),
    "_common.read_checkpoint": lambda path, common, omniglot: common.read_checkpoint(path),
    "_common.RunRecord": lambda path, common, omniglot: _run_record(common, path),
    "omniglot.read_best": lambda path, common, omniglot: omniglot.read_best(path),
}


@pytest.fixture(params=sorted(LOADERS))
def loader(request, common, omniglot_example):
    """Each way a file is read as a checkpoint: ``loader(path)``."""
    read = LOADERS[request.param]
    return lambda path: read(path, common, omniglot_example)


# --- crafted files -----------------------------------------------------------------------


class RunsCode:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with
    ``os.system`` instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def crafted(kind: str, folder: Path) -> tuple[Path, Path]:
    """A crafted checkpoint and the marker file that loading it unsafely creates."""
    marker = folder / f"{kind}.marker"
    path = folder / kind / "checkpoint.pt"
    path.parent.mkdir()
    if kind == "plain":
        torch.save({"step": 3, "payload": RunsCode(marker)}, path)
    elif kind == "legacy":  # torch's format before the zip archive
        torch.save({"step": 3, "payload": RunsCode(marker)}, path, **{LEGACY: False})
    else:  # a complete, current-format checkpoint with the code hidden in the RNG state
        problem = make(ridge())
        state = {"format": "bilevel-checkpoint", "version": 2, **problem.state_dict()}
        state["rng"] = RunsCode(marker)
        torch.save(state, path)
    return path, marker


@pytest.mark.parametrize("kind", ["plain", "legacy", "disguised"])
def test_crafted_checkpoint_is_refused_without_running_code(tmp_path, loader, kind):
    path, marker = crafted(kind, tmp_path)
    with pytest.raises(CheckpointError) as error:
        loader(path)
    assert not marker.exists(), "loading the crafted file ran its code"
    message = str(error.value)
    assert "checkpoint.pt" in message
    assert "cannot be loaded safely" in message and "run code" in message
    assert "older bilevel" in message and "weights_only=False" in message
    assert "exec" in message  # what it refers to


def test_crafted_checkpoints_do_run_code_when_unpickled_unsafely(tmp_path):
    """The control: the files above are real attacks (this is what bilevel used to do)."""
    for kind in ("plain", "legacy", "disguised"):
        path, marker = crafted(kind, tmp_path)
        torch.load(path, weights_only=False)
        assert marker.exists(), kind


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_bare_pickle_is_refused_without_running_code(tmp_path, protocol):
    marker = tmp_path / "marker"
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"step": 1, "payload": RunsCode(marker)}, protocol=protocol))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt"):
        make(ridge()).load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_of_the_previous_format_is_refused_with_advice(tmp_path):
    """bilevel before format 2 pickled Python's and NumPy's RNG states."""
    problem = make(ridge())
    old = {k: v for k, v in problem.state_dict().items() if k != "rng"}
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    path = tmp_path / "old.pt"
    torch.save({**old, "rng": {**rng, "numpy": np.random.get_state()}}, path)
    with pytest.raises(CheckpointError, match="older bilevel") as error:
        problem.load_checkpoint(path)
    assert "numpy" in str(error.value) and "restart the run" in str(error.value)
    torch.save({**old, "rng": rng}, path)  # without NumPy: loadable, but no format header
    with pytest.raises(CheckpointError, match=r"older bilevel \(format 1\)"):
        problem.load_checkpoint(path)


# --- damaged and foreign files -----------------------------------------------------------


def _write_truncated(path: Path) -> None:
    make(ridge()).save_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_other_version(path: Path) -> None:
    torch.save({"format": "bilevel-checkpoint", "version": 99, "step": 1}, path)


DAMAGED = {
    "empty": (lambda path: path.write_bytes(b""), "is empty"),
    "truncated": (_write_truncated, "truncated or corrupted"),
    "random bytes": (
        lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)),
        "truncated or corrupted",
    ),
    "text": (lambda path: path.write_text("not a checkpoint\n"), "truncated or corrupted"),
    "foreign dict": (lambda path: torch.save({"a": 1}, path), "not a bilevel checkpoint"),
    "foreign tensor": (lambda path: torch.save(torch.ones(3), path), "not a bilevel checkpoint"),
    "other format": (
        lambda path: torch.save({"format": "something-else", "step": 1}, path),
        "not a bilevel checkpoint",
    ),
    "other version": (_write_other_version, "format version 99"),
    "missing": (lambda path: None, "no such checkpoint file"),
    "folder": (lambda path: path.mkdir(), "cannot read"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_damaged_or_foreign_file_names_itself(tmp_path, kind):
    write, expected = DAMAGED[kind]
    path = tmp_path / "checkpoint.pt"
    write(path)
    with pytest.raises(CheckpointError, match=expected) as error:
        checkpoint.load(path)
    assert str(path) in str(error.value)
    # no traceback of torch's above it
    assert error.value.__cause__ is None
    assert error.value.__context__ is None or error.value.__suppress_context__


@pytest.mark.parametrize("kind", ["empty", "truncated", "random bytes", "foreign dict"])
def test_every_loader_reports_a_damaged_file(tmp_path, loader, kind):
    write, expected = DAMAGED[kind]
    path = tmp_path / "checkpoint.pt"
    write(path)
    with pytest.raises(CheckpointError, match=expected) as error:
        loader(path)
    assert path.name in str(error.value)


def test_a_checkpoint_without_the_required_keys_is_refused(tmp_path, omniglot_example):
    path = tmp_path / "best.pt"
    checkpoint.save(path, {"step": 4})
    with pytest.raises(CheckpointError, match="without 'ul_model'"):
        omniglot_example.read_best(path)
    with pytest.raises(CheckpointError, match="without 'ul_model', 'll_model', 'rng'"):
        make(ridge()).load_checkpoint(path)


# --- real checkpoints --------------------------------------------------------------------


def _snapshot(problem):
    params = [t.detach().clone() for t in problem.ul.ul_model.parameters()]
    params += [t.detach().clone() for t in problem.ll.ll_model.parameters()]
    state = problem.ul_optimizer.state_dict()["state"]
    return params + [v for s in state.values() for v in s.values() if torch.is_tensor(v)]


def test_checkpoint_round_trips_bitwise(tmp_path):
    path = tmp_path / "ckpt.pt"
    seed_all(0)
    p = ridge()
    problem = make(p)
    draw = batch(p)
    for step in range(3):
        problem.step(*draw(step))
    problem.save_checkpoint(path)
    for step in range(3, 6):
        problem.step(*draw(step))
    expected = _snapshot(problem)

    seed_all(123)  # a new process starts from other states
    q = ridge()
    resumed = make(q)
    resumed.load_checkpoint(path)
    assert resumed.step_count == 3
    draw = batch(q)
    for step in range(3, 6):
        resumed.step(*draw(step))
    got = _snapshot(resumed)
    assert resumed.step_count == 6 and len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    # a plain weights-only load of torch reads it too
    saved = torch.load(path, weights_only=True)
    assert (saved["format"], saved["version"], saved["step"]) == ("bilevel-checkpoint", 2, 3)


def test_a_checkpoint_written_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """Its tensors are tagged ``cuda:0`` (as torch.save writes them on a GPU); CPU-only
    machines load it (map_location="cpu"), modules and optimizers take the values."""
    path = tmp_path / "gpu.pt"
    p = ridge()
    problem = make(p)
    problem.step(p.train, p.val)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        problem.save_checkpoint(path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the file really is tagged cuda
            torch.load(path, weights_only=True)
    resumed = make(ridge())
    resumed.load_checkpoint(path)
    assert resumed.step_count == 1
    for a, b in zip(_snapshot(resumed), _snapshot(problem), strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b)


def test_numpy_hyperparameters_are_saved_as_python_numbers(tmp_path):
    """A learning rate from ``np.logspace`` would make the file unloadable by a safe load."""
    path = tmp_path / "ckpt.pt"
    p = ridge()
    problem = make(p, lr=np.logspace(-2, -1, 3)[0])
    problem.step(p.train, p.val)
    problem.save_checkpoint(path)
    saved = checkpoint.load(path)
    assert type(saved["ul_optimizer"]["param_groups"][0]["lr"]) is float
    resumed = make(ridge(), lr=np.logspace(-2, -1, 3)[0])
    resumed.load_checkpoint(path)  # the settings still agree
    assert resumed.step_count == 1


def test_module_state_dict_metadata_survives(tmp_path):
    path = tmp_path / "bn.pt"
    net = torch.nn.BatchNorm1d(3)
    net.running_mean.fill_(2.0)
    checkpoint.save(path, {"model": net.state_dict()})
    loaded = checkpoint.load(path)["model"]
    assert loaded._metadata[""]["version"] == net.state_dict()._metadata[""]["version"]
    other = torch.nn.BatchNorm1d(3)
    other.load_state_dict(loaded)
    assert torch.equal(other.running_mean, net.running_mean)


def test_save_refuses_what_a_safe_load_would_refuse_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"step": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="weights-only load refuses"):
        checkpoint.save(path, {"step": 2, "rng": np.random.get_state()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file
    with pytest.raises(ValueError, match="may not set 'version'"):
        checkpoint.save(path, {"version": 1})
    checkpoint.save(path, checkpoint.load(path))  # its own header is fine


# --- RNG state ---------------------------------------------------------------------------


def _draws():
    return (
        torch.rand(4),
        torch.randn(3),
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
        np.random.rand(3),
        np.random.standard_normal(),
    )


def test_rng_state_round_trips_bitwise_through_a_file(tmp_path):
    seed_all(7)
    random.gauss(0.0, 1.0)  # Python keeps a second Gaussian (gauss_next)
    np.random.standard_normal()  # NumPy too (has_gauss, cached_gaussian)
    path = tmp_path / "rng.pt"
    checkpoint.save(path, {"rng": checkpoint.rng_state()})
    expected = _draws()
    seed_all(99)
    _draws()
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    got = _draws()
    for a, b in zip(got[:2], expected[:2], strict=True):
        assert torch.equal(a, b)
    assert got[2:4] == expected[2:4]
    assert np.array_equal(got[4], expected[4]) and got[5] == expected[5]


def test_rng_state_holds_only_tensors_and_plain_values():
    def check(value):
        if isinstance(value, dict):
            for v in value.values():
                check(v)
        elif isinstance(value, list | tuple):
            for v in value:
                check(v)
        else:
            assert value is None or type(value) in (int, float, str, bool, torch.Tensor), value

    check(checkpoint.rng_state())


# --- the atomic writer -------------------------------------------------------------------


def test_atomic_write_leaves_the_old_file_on_error(tmp_path):
    path = tmp_path / "progress.json"
    checkpoint.atomic_write_text(path, '{"a": 1}\n')

    def fails(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(path, fails)
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]


def test_atomic_write_removes_temporaries_of_killed_writers_only(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    stale = tmp_path / f"checkpoint.pt.{int(dead.stdout)}.abc12345.tmp"
    old_style = tmp_path / "checkpoint.pt.k2j4h5g6.tmp"  # from bilevel before this module
    live = tmp_path / f"checkpoint.pt.{os.getppid()}.xyz78901.tmp"  # a writer still running
    other = tmp_path / "other.pt.1.abc12345.tmp"
    # a user's own files whose names only begin like the checkpoint's: never touched
    users = [tmp_path / "checkpoint.pt.notes.tmp", tmp_path / "checkpoint.pt.1.2.k2j4h5g6.tmp"]
    # a process of an earlier life with this process's id (a restarted container)
    reused = tmp_path / f"checkpoint.pt.{os.getpid()}.def45678.tmp"
    mine = tmp_path / f"checkpoint.pt.{os.getpid()}.ghi01234.tmp"  # another thread's write
    for f in (stale, old_style, live, other, reused, mine, *users):
        f.write_bytes(b"partial")
    monkeypatch.setattr(checkpoint, "_writing", {mine.name})
    checkpoint.atomic_save({"a": torch.ones(2)}, path)
    assert not stale.exists() and not old_style.exists() and not reused.exists()
    assert live.exists() and other.exists() and mine.exists()
    assert all(f.exists() for f in users)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_write_json_of_the_examples_goes_through_the_atomic_writer(tmp_path, common, monkeypatch):
    path = tmp_path / "sub" / "results.json"
    written = []
    atomic_write = checkpoint.atomic_write
    monkeypatch.setattr(
        checkpoint, "atomic_write", lambda p, w, **k: written.append(p) or atomic_write(p, w, **k)
    )
    common.write_json(path, {"x": [1, 2]})
    assert written == [path]
    assert json.loads(path.read_text()) == {"x": [1, 2]} and path.read_text().endswith("}\n")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    """Checkpoints and results were written 0600 (mkstemp's mode): unreadable for the group
    on a shared machine, unlike every other file the run writes."""
    path = tmp_path / "results.json"
    checkpoint.atomic_write_text(path, "{}\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("{}\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == stat.S_IMODE(plain.stat().st_mode)
    mask = os.umask(0o022)
    os.umask(mask)
    assert mode == 0o666 & ~mask

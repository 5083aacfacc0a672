"""Runs of the examples that lose nothing (issue 12): SIGTERM/SIGINT save and resume bitwise,
checkpoints by time, damaged run files named, the output folder checked and locked, plots
optional, every flag documented.

Most runs are ``examples/quickstart.py --out`` on its generated data (a fraction of a second
with the tiny settings below); the Omniglot and MNIST runs use the real data for a few steps.
"""

from __future__ import annotations

import argparse
import csv
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from example_modules import EXAMPLES, example_module

from bilevel import BilevelProblem, checkpoint

# quickstart: a checkpoint every 10 UL steps (and at the end), a log record every 10
QUICK = ["--ll-steps", "20", "--features", "6", "--informative", "2", "--samples", "20"]
STEPS = 25


@pytest.fixture(scope="module")
def common():
    """examples/_common.py."""
    with example_module("_common") as module:
        yield module


@pytest.fixture(scope="module")
def quickstart(common):
    """examples/quickstart.py as a module."""
    with example_module("quickstart") as module:
        yield module


@pytest.fixture(scope="module")
def omniglot_example(common):
    """examples/omniglot.py as a module."""
    with example_module("omniglot") as module:
        yield module


@pytest.fixture(autouse=True)
def handlers_restored():
    """Every run puts the SIGTERM/SIGINT handlers back as they were."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    assert {s: signal.getsignal(s) for s in before} == before


def quick(module, out, steps=STEPS, *extra):
    """Run the quickstart (its output folder ``out``) and return its results."""
    argv = [*QUICK, "--ul-steps", str(steps), *extra]
    if out is not None:
        argv += ["--out", str(out)]
    return module.main(argv)


def step_of(path) -> int:
    return int(torch.load(path, weights_only=True)["step"])


def same_model(a: Path, b: Path) -> None:
    """The two checkpoints hold bitwise the same UL model and UL optimizer state."""
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"]
    for key, value in ca["ul_model"].items():
        assert torch.equal(value, cb["ul_model"][key]), key
    for sa, sb in zip(
        ca["ul_optimizer"]["state"].values(), cb["ul_optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def untimed(history):
    return [{k: v for k, v in h.items() if "seconds" not in k} for h in history]


def snapshot(folder: Path) -> dict[str, bytes]:
    """The bytes of every file of a run folder (but its lock file, rewritten by each run)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "run.lock"}


# --- 7. every flag has a help text; the quickstart has --out --------------------------------


@pytest.mark.parametrize("name", ["quickstart", "hyper_cleaning", "feature_penalty", "omniglot"])
def test_every_flag_has_a_help_text(common, name):
    with example_module(name) as module:
        parser = module.make_parser()
    options = {o for a in parser._actions for o in a.option_strings}
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    assert "--out" in options
    if name != "quickstart":  # the examples that loop long
        assert "--checkpoint-minutes" in options


def test_quickstart_without_out_writes_nothing(quickstart, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = quick(quickstart, None, 12)
    assert results["ul_steps"] == 12 and results["test_mse"] > 0
    assert list(tmp_path.iterdir()) == []


def test_quickstart_out_writes_results_and_resumes_exactly(quickstart, tmp_path):
    once = quick(quickstart, tmp_path / "once", 30)
    quick(quickstart, tmp_path / "twice", 20)
    twice = quick(quickstart, tmp_path / "twice", 30)  # more steps: resumes at 20
    assert twice["resumed_from_step"] == 20 and twice["ul_steps"] == once["ul_steps"] == 30
    saved = json.loads((tmp_path / "twice" / "results.json").read_text())
    assert saved["log_l2"] == once["log_l2"] and saved["test_mse"] == once["test_mse"]
    assert untimed(saved["history"]) == untimed(once["history"])
    assert [h["step"] for h in saved["history"]] == [10, 20, 30]
    same_model(tmp_path / "once" / "checkpoint.pt", tmp_path / "twice" / "checkpoint.pt")
    assert saved["command"].startswith("python examples/quickstart.py")


# --- 1. SIGTERM and SIGINT ---------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {examples!r})
    import quickstart
    from bilevel import BilevelProblem

    step = BilevelProblem.step

    def slow(self, train, val):  # slow after step 10, so that the signal lands mid-run
        loss = step(self, train, val)
        if self.step_count > 10:
            time.sleep(0.3)
        return loss

    BilevelProblem.step = slow
    quickstart.main(sys.argv[1:])
    """
)


def test_sigterm_mid_run_saves_and_the_same_command_resumes_bitwise(quickstart, tmp_path):
    """A real SIGTERM to a separate process: it saves the steps done, exits with 143, and
    the same command then ends bitwise where an uninterrupted run does."""
    steps = 30
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(examples=str(EXAMPLES)))
    out = tmp_path / "killed"
    argv = [*QUICK, "--ul-steps", str(steps), "--out", str(out)]
    child = subprocess.Popen(
        [sys.executable, str(script), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    full = quick(quickstart, tmp_path / "full", steps)  # while the child starts
    deadline = time.time() + 120
    progress = out / "progress.json"
    while time.time() < deadline and child.poll() is None:  # until step 10 is logged
        with_history = progress.exists() and json.loads(progress.read_text() or "{}")
        if with_history and with_history.get("history"):
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    stderr = stderr.decode()
    assert child.returncode == 128 + signal.SIGTERM, stderr  # 143
    stopped = re.search(r"SIGTERM: stopped after UL step (\d+)", stderr)
    assert stopped, stderr
    done = int(stopped.group(1))
    assert 10 <= done < steps  # it was stopped mid-run
    assert step_of(out / "checkpoint.pt") == done  # the steps done are saved, not fewer
    assert "Traceback" not in stderr
    assert not list(out.glob("*.tmp")) and not (out / "results.json").exists()

    resumed = quick(quickstart, out, steps)
    assert resumed["resumed_from_step"] == done
    assert resumed["log_l2"] == full["log_l2"] and resumed["test_mse"] == full["test_mse"]
    assert untimed(resumed["history"]) == untimed(full["history"])
    same_model(tmp_path / "full" / "checkpoint.pt", out / "checkpoint.pt")


def _signal_at(monkeypatch, calls: dict[int, int], method: str = "step") -> None:
    """Patch ``BilevelProblem.<method>``: after call ``n`` of them, send ``calls[n]`` to this
    process (several times if it is a list)."""
    original = getattr(BilevelProblem, method)
    count = 0

    def patched(self, *args):
        nonlocal count
        count += 1
        result = original(self, *args)
        sent = calls.get(count, [])
        for signum in sent if isinstance(sent, list) else [sent]:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(BilevelProblem, method, patched)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_under_way_and_exits_128_plus_its_number(
    quickstart, tmp_path, monkeypatch, capsys, signum
):
    full = quick(quickstart, tmp_path / "full")
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _signal_at(patch, {13: signum})
        with pytest.raises(SystemExit) as stop:
            quick(quickstart, out)
    assert stop.value.code == 128 + signum  # 143, 130
    name = signal.Signals(signum).name
    assert f"{name}: stopped after UL step 13" in capsys.readouterr().err
    assert step_of(out / "checkpoint.pt") == 13  # not 10, the last periodic checkpoint
    progress = json.loads((out / "progress.json").read_text())
    assert [h["step"] for h in progress["history"]] == [10]
    resumed = quick(quickstart, out)
    assert resumed["resumed_from_step"] == 13
    assert resumed["log_l2"] == full["log_l2"]
    same_model(tmp_path / "full" / "checkpoint.pt", out / "checkpoint.pt")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once_and_the_last_checkpoint_stands(
    quickstart, tmp_path, monkeypatch, signum, capsys
):
    """A second SIGTERM (a scheduler insisting) was ignored: the step ran to its end."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _signal_at(patch, {13: [signum, signum]})
        with pytest.raises(SystemExit) as stop:
            quick(quickstart, out)
    assert stop.value.code == 128 + signum
    name = signal.Signals(signum).name
    assert f"{name}: stopped at once; the last checkpoint (UL step 10) stands" in (
        capsys.readouterr().err
    )
    assert step_of(out / "checkpoint.pt") == 10
    assert not list(out.glob("*.tmp"))
    assert quick(quickstart, out)["resumed_from_step"] == 10


def test_a_signal_outside_the_ul_loop_stops_at_once(quickstart, tmp_path, monkeypatch, capsys):
    make_data = quickstart.make_data

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return make_data(*args)

    monkeypatch.setattr(quickstart, "make_data", interrupted)
    with pytest.raises(SystemExit) as stop:
        quick(quickstart, tmp_path)
    assert stop.value.code == 143
    assert "outside the UL loop" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_signal_without_out_stops_with_nothing_saved(quickstart, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        _signal_at(patch, {3: signal.SIGINT})
        with pytest.raises(SystemExit) as stop:
            quick(quickstart, None)
    assert stop.value.code == 130
    assert "nothing saved" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- Omniglot: its own meta-training loop ------------------------------------------------

TINY = (
    *("--hidden", "8", "--meta-batch", "2", "--query", "2", "--val-tasks", "2"),
    *("--eval-tasks", "2", "--eval-query", "2", "--no-progress", "--threads", "1"),
)


def omniglot_run(module, out, data_root, cache, *extra):
    argv = ["--data-root", str(data_root), "--cache-dir", str(cache), "--out", str(out)]
    return module.main([*argv, *TINY, *extra])


def csv_rows(folder):
    with open(folder / "log.csv") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


OMNIGLOT = ("--method", "maml", "--meta-steps", "6", "--log-every", "2", "--eval-every", "4")


@pytest.fixture(scope="module")
def omniglot_reference(omniglot_example, omniglot, data_root, data_cache_dir, tmp_path_factory):
    """An uninterrupted Omniglot run of 6 meta-steps (log records every 2, checkpoints 4)."""
    out = tmp_path_factory.mktemp("omniglot") / "once"
    omniglot_run(omniglot_example, out, data_root, data_cache_dir, *OMNIGLOT)
    return out


def test_omniglot_sigterm_between_log_records_resumes_bitwise(
    omniglot_example, omniglot_reference, data_root, data_cache_dir, tmp_path, monkeypatch
):
    """Stopped at step 3 (log records every 2 steps): the checkpoint holds step 3 and the
    running means since step 2, so that the log and the model go on exactly."""
    out = tmp_path / "twice"
    with monkeypatch.context() as patch:
        _signal_at(patch, {3: signal.SIGTERM}, method="meta_step")
        with pytest.raises(SystemExit) as stop:
            omniglot_run(omniglot_example, out, data_root, data_cache_dir, *OMNIGLOT)
    assert stop.value.code == 143
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3 and saved["pending_log"]["losses"].shape == (1,)
    resumed = omniglot_run(omniglot_example, out, data_root, data_cache_dir, *OMNIGLOT)
    assert resumed["resumed_from_step"] == 3 and resumed["meta_steps"] == 6
    same_model(omniglot_reference / "checkpoint.pt", out / "checkpoint.pt")
    assert csv_rows(omniglot_reference) == csv_rows(out)
    assert [int(r["step"]) for r in csv_rows(out)] == [2, 4, 6]


def test_omniglot_damaged_best_model_is_named_before_any_training(
    omniglot_example, omniglot_reference, data_root, data_cache_dir, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(omniglot_reference, out)
    _truncate(out / "best.pt")
    before = snapshot(out)
    more = (*OMNIGLOT, "--meta-steps", "8")  # the last --meta-steps counts
    with pytest.raises(SystemExit, match="truncated or corrupted") as error:
        omniglot_run(omniglot_example, out, data_root, data_cache_dir, *more)
    assert str(out / "best.pt") in str(error.value.code)
    assert snapshot(out) == before


# --- 2. checkpoints by time --------------------------------------------------------------


def _crash_at(monkeypatch, call: int, method: str) -> None:
    """``BilevelProblem.<method>`` raises at call ``call`` (a crash, not a signal)."""
    original = getattr(BilevelProblem, method)
    count = 0

    def patched(self, *args):
        nonlocal count
        count += 1
        if count == call:
            raise RuntimeError("simulated crash")
        return original(self, *args)

    monkeypatch.setattr(BilevelProblem, method, patched)


def test_omniglot_checkpoint_minutes_saves_between_periodic_checkpoints(
    omniglot_example, omniglot_reference, data_root, data_cache_dir, tmp_path, monkeypatch
):
    """With --checkpoint-minutes tiny, a checkpoint after every step: a crash in step 4 loses
    only that step (the periodic checkpoint is every 4: none yet); the resumed run is exact."""
    for minutes, expected in (("0", None), ("1e-9", 3)):  # 0: by steps only
        out = tmp_path / f"crash-{expected}"
        with monkeypatch.context() as patch:
            _crash_at(patch, 4, "meta_step")
            with pytest.raises(RuntimeError, match="simulated crash"):
                omniglot_run(
                    omniglot_example, out, data_root, data_cache_dir, *OMNIGLOT,
                    "--checkpoint-minutes", minutes,
                )  # fmt: skip
        checkpoint_file = out / "checkpoint.pt"
        assert (step_of(checkpoint_file) if checkpoint_file.exists() else None) == expected
    resumed = omniglot_run(omniglot_example, out, data_root, data_cache_dir, *OMNIGLOT)
    assert resumed["resumed_from_step"] == 3
    same_model(omniglot_reference / "checkpoint.pt", out / "checkpoint.pt")
    assert csv_rows(omniglot_reference) == csv_rows(out)


def _ridge_problem():
    from problems import ridge, ridge_ll, ridge_ul

    from bilevel.ll import GradientDescent
    from bilevel.ul import Implicit

    torch.manual_seed(0)
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=20)
    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.5, k=5)
    problem = BilevelProblem(ll, ul, torch.optim.Adam(p.ul_model.parameters(), lr=0.05))

    def batch(step):  # random minibatches: the RNG state must be saved with the checkpoint
        idx = torch.randint(0, 60, (30,))
        return (p.train[0][idx], p.train[1][idx]), p.val

    return problem, batch


def test_checkpoint_minutes_through_the_runner(common, tmp_path, monkeypatch):
    """The examples that call BilevelProblem.run (hyper_cleaning, feature_penalty): with
    checkpoint_minutes tiny, a crash in step 4 of a run checkpointed every 10 steps resumes
    from step 3, and ends bitwise where an uninterrupted run does."""

    def run(out, minutes=None):
        problem, batch = _ridge_problem()
        with common.Run(out, {"ridge": 1}, checkpoint_minutes=minutes) as run:
            run.run_problem(problem, batch, 8, checkpoint_every=10, progress=False)
        return problem

    full = run(tmp_path / "full")
    with monkeypatch.context() as patch:
        _crash_at(patch, 4, "step")
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(tmp_path / "crashed", 1e-9)
    assert step_of(tmp_path / "crashed" / "checkpoint.pt") == 3  # the runner alone: none
    resumed = run(tmp_path / "crashed")
    assert resumed.step_count == 8
    for a, b in zip(full.ul_params, resumed.ul_params, strict=True):
        assert torch.equal(a, b)


def test_checkpoint_minutes_must_be_a_number_at_least_zero(common):
    parser = argparse.ArgumentParser()
    common.add_checkpoint_minutes(parser)
    assert parser.parse_args([]).checkpoint_minutes == 10.0
    for bad in ("-1", "nan", "soon"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--checkpoint-minutes", bad])


# --- 3. damaged, foreign or missing run files ------------------------------------------


@pytest.fixture(scope="module")
def finished(quickstart, tmp_path_factory):
    """A quickstart run folder of 20 UL steps, to be copied and damaged."""
    out = tmp_path_factory.mktemp("finished") / "run"
    quick(quickstart, out, 20)
    return out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "checkpoint empty": ("checkpoint.pt", lambda p: p.write_bytes(b""), "is empty"),
    "checkpoint truncated": ("checkpoint.pt", _truncate, "truncated or corrupted"),
    "checkpoint random": (  # seeded: the same bytes on every run
        "checkpoint.pt",
        lambda p: p.write_bytes(random.Random(0).randbytes(3000)),
        "corrupt",
    ),
    "checkpoint foreign": (
        "checkpoint.pt",
        lambda p: torch.save({"weight": torch.ones(2)}, p),
        "not a bilevel checkpoint",
    ),
    "checkpoint best-model file": (
        "checkpoint.pt",
        lambda p: checkpoint.save(p, {"ul_model": {}, "step": 3}),
        "without 'll_model', 'rng'",
    ),
    "progress empty": ("progress.json", lambda p: p.write_text(""), "is empty"),
    "progress truncated": ("progress.json", _truncate, "truncated or corrupted"),
    "progress binary": ("progress.json", lambda p: p.write_bytes(b"\xff\xfe\x00"), "not text"),
    "progress list": ("progress.json", lambda p: p.write_text("[1, 2]"), "not the progress"),
    "progress foreign dict": (
        "progress.json",
        lambda p: p.write_text('{"loss": 0.3}'),
        "not the progress",
    ),
    "progress record without step": (
        "progress.json",
        lambda p: p.write_text('{"settings": {}, "history": [{"loss": 1}]}'),
        "not the progress",
    ),
    "progress missing": ("progress.json", lambda p: p.unlink(), "is missing"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_run_file_is_named_with_the_cure_and_nothing_is_written(
    quickstart, finished, tmp_path, kind
):
    name, damage, expected = DAMAGE[kind]
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    damage(out / name)
    before = snapshot(out)
    with pytest.raises(SystemExit) as error:
        quick(quickstart, out, 30)
    message = str(error.value.code)
    assert str(out / name) in message, message
    assert expected in message
    assert "delete" in message  # what to do
    if name == "progress.json":
        assert "checkpoint.pt" in message and "Restore" in message
    assert snapshot(out) == before  # the run's files untouched, nothing added


def test_other_settings_are_named(quickstart, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with pytest.raises(SystemExit, match=r"other settings \(ll_lr: 0\.15 there, 0\.1 now\)"):
        quick(quickstart, out, 30, "--ll-lr", "0.1")


# --- 4. the output folder ----------------------------------------------------------------


def test_out_that_is_a_file_is_refused(quickstart, tmp_path):
    path = tmp_path / "results"
    path.write_text("mine")
    with pytest.raises(SystemExit, match="is a file, not a folder") as error:
        quick(quickstart, path, 10)
    assert str(path) in str(error.value.code) and path.read_text() == "mine"
    with pytest.raises(SystemExit, match="cannot create the output folder") as error:
        quick(quickstart, path / "run", 10)  # a file in the way
    assert str(path / "run") in str(error.value.code)


def test_read_only_out_is_refused_before_the_first_step(quickstart, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    ran = []
    monkeypatch.setattr(quickstart, "make_data", lambda *a: ran.append(1))
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse as a read-only one
        mkstemp = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == out:
                raise PermissionError(errno.EACCES, "Permission denied", str(out))
            return mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        out.chmod(0o500)
    try:
        with pytest.raises(SystemExit, match="cannot write to the output folder") as error:
            quick(quickstart, out, 10)
    finally:
        out.chmod(0o700)
    assert str(out) in str(error.value.code) and "make it writable" in str(error.value.code)
    assert not ran and list(out.iterdir()) == []


def test_full_disk_is_refused_before_the_first_step(quickstart, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit, match="No space left on device") as error:
        quick(quickstart, tmp_path / "run", 10)
    assert str(tmp_path / "run") in str(error.value.code)
    assert "free some space" in str(error.value.code)
    assert list((tmp_path / "run").iterdir()) == []  # no probe, no temporary file left


def test_too_little_free_space_for_two_checkpoints_is_refused(quickstart, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(SystemExit, match="MiB free") as error:
        quick(quickstart, tmp_path / "run", 10)
    assert str(tmp_path / "run") in str(error.value.code)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_disk_full_during_the_run_names_the_folder_and_keeps_the_last_checkpoint(
    quickstart, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    save = torch.save
    saves = 0

    def fills_the_disk(obj, f, *args, **kwargs):
        nonlocal saves
        if isinstance(obj, dict) and "ul_model" in obj:
            saves += 1
            if saves == 2:  # the checkpoint of step 20: half written, then the disk is full
                f.write(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(SystemExit) as error:
        quick(quickstart, out)
    message = str(error.value.code)
    assert str(out) in message and "No space left on device" in message
    assert "free some space" in message and "UL step 10" in message
    monkeypatch.undo()
    assert step_of(out / "checkpoint.pt") == 10  # whole, the previous one
    assert not list(out.glob("*.tmp"))
    assert quick(quickstart, out)["resumed_from_step"] == 10


# --- 5. two runs on one folder -----------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, f"{os.getpid()} somehost\\n".encode(), 0)
    print("locked", flush=True)
    time.sleep(120)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX file locks")
def test_a_second_run_on_the_same_folder_is_refused_until_the_first_ends(
    quickstart, finished, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out / "run.lock")], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = snapshot(out)
        with pytest.raises(SystemExit) as error:
            quick(quickstart, out, 30)
        message = str(error.value.code)
        assert str(out) in message and f"process {holder.pid} on somehost" in message
        assert "another --out" in message
        assert snapshot(out) == before  # the first run's files (and temporaries) untouched
    finally:
        holder.kill()  # SIGKILL: the OS releases its lock
        holder.wait()
    assert quick(quickstart, out, 30)["resumed_from_step"] == 20


def test_the_lock_is_held_for_the_run_and_released_after_it(common, tmp_path):
    with common.Run(tmp_path, {}) as run:
        assert run.lock is not None
        assert (tmp_path / "run.lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(SystemExit, match=f"process {os.getpid()}"):
            with common.Run(tmp_path, {}):
                pass
    with common.Run(tmp_path, {}):  # released
        pass


# --- 6. plots are optional ---------------------------------------------------------------


def test_without_matplotlib_omniglot_writes_results_checkpoint_and_csv(
    omniglot_example, omniglot, data_root, data_cache_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    monkeypatch.setattr(omniglot_example._common, "_warned_no_matplotlib", False, raising=False)
    args = ("--method", "maml", "--meta-steps", "2", "--eval-every", "2")
    omniglot_run(omniglot_example, tmp_path, data_root, data_cache_dir, *args)
    for name in ("results.json", "checkpoint.pt", "log.csv", "best.pt"):
        assert (tmp_path / name).exists(), name
    assert not (tmp_path / "curve.png").exists()
    assert "install matplotlib" in capsys.readouterr().err


# short runs: the implicit method says that their few LL steps leave the LL short of stationary
@pytest.mark.filterwarnings("ignore:The LL gradient:RuntimeWarning")
@pytest.mark.parametrize(
    ("name", "plot"), [("hyper_cleaning", "weights_hist.png"), ("feature_penalty", "penalty.png")]
)
def test_without_matplotlib_the_mnist_examples_write_their_results(
    common, data_root, require_data, tmp_path, monkeypatch, name, plot
):
    require_data(data_root / "MNIST")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = [
        "--data-root", str(data_root), "--n-train", "100", "--n-val", "100", "--ll-steps", "3",
        "--final-steps", "3", "--ul-steps", "2", "--log-every", "1", "--no-progress",
        "--threads", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    with example_module(name) as module:
        results = module.main(argv)
    assert results["ul_steps"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["ul_steps"] == 2
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / plot).exists()


def test_plots_are_written_atomically(common, tmp_path, monkeypatch):
    plt = common.pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    written = []
    atomic_write = checkpoint.atomic_write
    monkeypatch.setattr(
        checkpoint, "atomic_write", lambda p, w, **k: written.append(p) or atomic_write(p, w, **k)
    )
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    common.save_figure(fig, tmp_path / "curve.png")
    assert written == [tmp_path / "curve.png"]
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


# --- command-line values a review found accepted (2026-12-03) -----------------------------

BAD_ARGUMENTS = [
    # an empty validation set stopped with "the UL loss is not finite ... lower the learning
    # rate", a wrong cure; --n-train 0 a ZeroDivisionError
    ("hyper_cleaning", ["--n-val", "0"], "--n-val: must be an integer >= 1"),
    ("hyper_cleaning", ["--n-train", "-5"], "--n-train: must be an integer >= 1"),
    ("hyper_cleaning", ["--neumann-alpha", "abc"], "--neumann-alpha is 'auto' or a number"),
    ("hyper_cleaning", ["--corrupt", "1.5"], "--corrupt is a fraction"),
    ("hyper_cleaning", ["--log-every", "0"], "--log-every: must be an integer >= 1"),
    # refused only after MNIST was loaded and two reference models trained (10 s)
    ("hyper_cleaning", ["--method", "forward"], "with 5000 example weights (--n-train)"),
    # exited 0 with an untrained model's accuracy; a math domain error
    ("feature_penalty", ["--final-steps", "0"], "--final-steps: must be an integer >= 1"),
    ("feature_penalty", ["--init-l2", "0"], "--init-l2: must be a finite number > 0"),
    # ZeroDivisionError; a non-contracting layer accepted
    ("equilibrium_mnist", ["--batch", "0"], "--batch: must be an integer >= 1"),
    ("equilibrium_mnist", ["--batch", "60000"], "--batch must be at most the 50000"),
    ("equilibrium_mnist", ["--gamma", "1.5"], "--gamma must lie in"),
    # a NaN budget never stopped the run; 0 or fewer minutes ran a step anyway
    ("omniglot", ["--max-minutes", "nan"], "--max-minutes: must be a finite number > 0"),
    ("omniglot", ["--max-minutes", "0"], "--max-minutes: must be a finite number > 0"),
    ("omniglot", ["--budget-cpu-minutes", "nan"], "--budget-cpu-minutes: must be a finite"),
    ("omniglot", ["--meta-lr", "0"], "--meta-lr: must be a finite number > 0"),
    ("omniglot", ["--ways", "1"], "--ways must be >= 2"),
    ("omniglot", ["--truncate", "50", "--inner-steps", "10"], "--truncate (50) is more than"),
    ("omniglot", ["--threads", "0"], "--threads: must be an integer >= 1"),
    # wrote checkpoint.pt, results.json, ... into the current folder
    ("quickstart", ["--out", ""], "--out: must name a folder"),
    # (review 2026-12-04) tracebacks from torch.optim or the solver, after the data was made
    ("quickstart", ["--ll-lr", "nan"], "--ll-lr: must be a finite number > 0"),
    ("quickstart", ["--ul-lr", "-1"], "--ul-lr: must be a finite number > 0"),
    ("quickstart", ["--tolerance", "nan"], "--tolerance: must be a finite number > 0"),
    ("quickstart", ["--ul-steps", "0"], "--ul-steps: must be an integer >= 1"),
    ("hyper_cleaning", ["--out", ""], "--out: must name a folder"),
    # (review 2026-12-03b) refused by the library after the data was loaded, naming its own
    # arguments (ways=, shots + queries, queries, seed, tolerance, n_train + n_val) or none
    *[
        ("omniglot", argv, message)
        for argv, message in [
            # "ways=401 is more than the 400 classes in images": which split?
            (["--ways", "401"], "--ways 401 is more than the 400 classes of the meta-validation"),
            (["--shots", "5", "--query", "16"], "--shots 5 + --query 16 = 21 images of each"),
            (["--shots", "5", "--eval-query", "16"], "--shots 5 + --eval-query 16 = 21"),
            (["--eval-query", "0"], "--eval-query must be >= 1"),
            (["--seed", "-1"], "--seed: must be an integer in [0, 2**64)"),
            (["--method", "imaml", "--cg-tolerance", "-1"], "--cg-tolerance: must be a finite"),
        ]
    ],
    ("equilibrium_mnist", ["--seed", str(2**64)], "--seed: must be an integer in [0, 2**64)"),
    *[
        (script, ["--n-train", "59000", "--n-val", "5000"], "--n-train + --n-val is 64000")
        for script in ("hyper_cleaning", "feature_penalty")
    ],
]


@pytest.mark.parametrize(("script", "argv", "message"), BAD_ARGUMENTS)
def test_a_bad_command_line_value_is_refused_by_its_flag(script, argv, message, capsys):
    with example_module(script) as module, pytest.raises(SystemExit) as stop:
        module.parse_args(argv)
    assert stop.value.code == 2  # argparse's usage error, before any work
    assert message in capsys.readouterr().err


# --- what a data loader refuses, named by the scripts' flags (review 2026-12-03b) ------------

#: the library's spellings of its cures, which no script accepts
LIBRARY_CURES = ("download=True", "check_md5=False", "root=", "cache_dir=")
DATA_SCRIPTS = ("omniglot", "hyper_cleaning", "feature_penalty", "equilibrium_mnist")


def refusal(script: str, *argv: str) -> str:
    """The message that ``examples/<script>.py`` stops with (without a traceback)."""
    with example_module(script) as module, pytest.raises(SystemExit) as stop:
        module.main(list(argv))
    message = stop.value.code
    assert isinstance(message, str), message  # a message, not argparse's usage error (2)
    return message


@pytest.mark.parametrize("script", DATA_SCRIPTS)
def test_missing_data_is_refused_with_the_scripts_flags(script, tmp_path, monkeypatch):
    """No data files, no data folder, an empty --data-root: the cures were the library's
    "pass download=True" and "pass root=", as a traceback."""
    out = ("--out", str(tmp_path / "run"), "--no-progress")
    missing = refusal(script, "--data-root", str(tmp_path / "data"), *out)
    assert "add --download" in missing and "give --data-root" in missing
    assert "MNIST/" in missing or "omniglot/" in missing
    empty = refusal(script, "--data-root", "", *out)
    assert empty.startswith("--data-root is an empty path") and "leave --data-root out" in empty
    monkeypatch.delenv("BILEVEL_DATA", raising=False)
    unset = refusal(script, *out)
    assert "give --data-root or set the BILEVEL_DATA environment variable" in unset
    for message in (missing, empty, unset):
        assert not any(cure in message for cure in LIBRARY_CURES), message


def test_an_omniglot_zip_of_unknown_md5_is_usable_from_the_command_line(tmp_path):
    """A zip whose md5 is none of the known ones (one's own copy) was refused with "pass
    check_md5=False", which the script had no way to pass: --no-check-md5 does."""
    folder = tmp_path / "data" / "omniglot"
    folder.mkdir(parents=True)
    for part in ("images_background", "images_evaluation"):
        (folder / f"{part}.zip").write_bytes(b"not a zip")
    argv = ("--data-root", str(folder.parent), "--cache-dir", str(tmp_path / "cache"))
    argv += ("--out", str(tmp_path / "run"), "--no-progress")
    unknown = refusal("omniglot", *argv)
    assert "is not one of the known sums" in unknown and "add --no-check-md5" in unknown
    damaged = refusal("omniglot", *argv, "--no-check-md5")  # accepted: then read
    assert "cannot read it as a zip archive" in damaged and "add --download" in damaged
    for message in (unknown, damaged):
        assert not any(cure in message for cure in LIBRARY_CURES), message


@pytest.mark.parametrize("script", ["hyper_cleaning", "feature_penalty", "equilibrium_mnist"])
def test_mnist_files_of_another_md5_are_refused_and_usable_from_the_command_line(script, tmp_path):
    """MNIST's md5 is checked by default (before: another data set's files under MNIST's
    names loaded silently); the refusal names --download and --no-check-md5, which takes
    them."""
    folder = tmp_path / "data" / "MNIST"
    folder.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"not MNIST")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"not MNIST")
    argv = ("--data-root", str(folder.parent), "--out", str(tmp_path / "run"), "--no-progress")
    unknown = refusal(script, *argv)
    assert "differ from the official release" in unknown
    assert "add --download" in unknown and "add --no-check-md5" in unknown
    damaged = refusal(script, *argv, "--no-check-md5")  # accepted: then read
    assert "cannot decompress it" in damaged and "add --download" in damaged
    for message in (unknown, damaged):
        assert not any(cure in message for cure in LIBRARY_CURES), message


def test_a_data_warning_is_named_by_the_scripts_flags(common, tmp_path):
    """A cache that cannot be written is warned about with "pass cache_dir=": the Omniglot
    script names its --cache-dir."""
    from bilevel.data import omniglot

    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    with pytest.warns(RuntimeWarning) as caught, common.loading_data():
        assert not omniglot._save_cache(blocked / "cache.npz", {})
    (warning,) = caught
    assert "give --cache-dir or set BILEVEL_CACHE" in str(warning.message)
    assert "cache_dir=" not in str(warning.message)


# --- a finished run run again: a re-evaluation, not a resume (review 2026-12-03b) ------------


def test_a_finished_run_run_again_is_recorded_as_a_reevaluation(quickstart, tmp_path, capsys):
    """The same command on a finished run takes no step and evaluates the model again: it was
    recorded as an invocation that resumed (resumed_from_step 20, an invocation "from step
    20" among those that trained the model) and said "resuming from UL step 20"."""
    out = tmp_path / "run"
    first = quick(quickstart, out, 20)
    capsys.readouterr()
    again = quick(quickstart, out, 20)
    said = capsys.readouterr().out
    assert "is finished" in said and "evaluating it again" in said and "resuming" not in said
    assert (first["resumed_from_step"], first["reevaluation"]) == (0, False)
    assert (again["resumed_from_step"], again["reevaluation"]) == (None, True)
    assert again["invocations"] == first["invocations"]
    assert [i["from_step"] for i in again["invocations"]] == [0]
    assert json.loads((out / "results.json").read_text())["reevaluation"] is True
    more = quick(quickstart, out, 30)  # a resume: the re-evaluation trained nothing
    assert (more["resumed_from_step"], more["reevaluation"]) == (20, False)
    assert [i["from_step"] for i in more["invocations"]] == [0, 20]


def test_a_finished_run_run_again_with_fewer_steps_is_a_reevaluation(quickstart, tmp_path, capsys):
    """Asked for fewer steps than the finished run took, the command said "evaluating it
    again" and then ended in the runner's ValueError (steps=10 ... past it)."""
    out = tmp_path / "run"
    first = quick(quickstart, out, 20)
    capsys.readouterr()
    again = quick(quickstart, out, 10)
    said = capsys.readouterr().out
    assert "is finished" in said and "evaluating it again" in said
    assert again["reevaluation"] is True and again["invocations"] == first["invocations"]
    assert step_of(out / "checkpoint.pt") == 20


def test_a_finished_omniglot_run_run_again_is_recorded_as_a_reevaluation(
    omniglot_example, tmp_path, monkeypatch
):
    """examples/omniglot.py on a finished run (on a stand-in for the data set) re-tests its
    best model: results.json says so, and names only the invocation that trained it."""
    from test_example_measurements import FakeOmniglot

    monkeypatch.setattr(omniglot_example, "Omniglot", FakeOmniglot)
    monkeypatch.setattr(omniglot_example._common, "pyplot", lambda: None)
    argv = ["--out", str(tmp_path), *TINY, "--ways", "3", "--meta-steps", "2"]
    argv += ["--eval-every", "2", "--inner-steps", "1"]
    first = omniglot_example.main(argv)
    again = omniglot_example.main(argv)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (first["resumed_from_step"], first["reevaluation"]) == (0, False)
    assert (saved["resumed_from_step"], saved["reevaluation"]) == (None, True)
    assert saved["meta_steps"] == 2 and saved["evaluated_model"] == "best"
    assert saved["invocations"] == first["invocations"] == again["invocations"]
    assert [i["from_step"] for i in saved["invocations"]] == [0]


@pytest.mark.parametrize("script", ["hyper_cleaning", "feature_penalty"])
def test_a_diverging_ll_is_cured_by_the_scripts_flag(script, tmp_path, monkeypatch):
    """--ll-lr 1000 makes the LL diverge; the library's cure is "use lr=1.47 or less", which
    the scripts take as --ll-lr (feature_penalty stopped with a traceback)."""
    from test_example_measurements import fake_mnist

    argv = ["--out", str(tmp_path), "--n-train", "30", "--n-val", "20", "--ll-steps", "2"]
    argv += ["--final-steps", "2", "--ul-steps", "1", "--no-progress", "--ll-lr", "1000"]
    with example_module(script) as module:
        monkeypatch.setattr(module._common, "mnist_split", fake_mnist())
        monkeypatch.setattr(module._common, "pyplot", lambda: None)
        with pytest.raises(SystemExit) as stop:
            module.main(argv)
    message = str(stop.value.code)
    assert message.startswith("implicit-cg stopped at UL step 0") and "diverging" in message
    assert re.search(r"On the command line: --ll-lr \d\S* or less\.$", message), message


def test_a_diverging_neumann_series_is_cured_by_the_scripts_flag(tmp_path, monkeypatch):
    """--neumann-alpha 100 makes the series diverge; the library's cure is "use alpha=1.73
    (alpha='auto' does this) or method='cg'", which the script takes as --neumann-alpha (it
    named only the library's alpha)."""
    from test_example_measurements import fake_mnist

    argv = ["--out", str(tmp_path), "--n-train", "30", "--n-val", "20", "--ll-steps", "20"]
    argv += ["--final-steps", "20", "--ul-steps", "1", "--no-progress"]
    argv += ["--method", "implicit-neumann", "--neumann-alpha", "100"]
    with example_module("hyper_cleaning") as module:
        monkeypatch.setattr(module._common, "mnist_split", fake_mnist())
        monkeypatch.setattr(module._common, "pyplot", lambda: None)
        with pytest.raises(SystemExit) as stop:
            module.main(argv)
    message = str(stop.value.code)
    assert message.startswith("implicit-neumann stopped at UL step 0"), message
    assert "series diverged" in message
    pattern = r"On the command line: --neumann-alpha (\S+), or --neumann-alpha auto\.$"
    safe = re.search(pattern, message)
    assert safe is not None, message
    assert 0 < float(safe.group(1)) < 100


# --- review of the examples (helper's findings, 2026-12-04) ---------------------------------


def test_the_quickstart_stops_a_diverging_ll_with_its_flags_cure(quickstart, tmp_path):
    """It stopped with two chained tracebacks (--ul-steps 80 at the defaults diverged at UL
    step 77), naming the library's lr= rather than its flag."""
    with pytest.raises(SystemExit) as stop:
        quick(quickstart, tmp_path / "run", 1, "--ll-lr", "1000", "--ll-steps", "5")
    message = str(stop.value.code)
    assert message.startswith("implicit-cg stopped at UL step 0") and "diverging" in message
    assert "is at least about" in message  # a lower estimate (power iteration)
    assert re.search(r"On the command line: --ll-lr \d\S* or less\.$", message), message


def test_the_quickstarts_seed_is_checked_as_the_other_examples(quickstart, capsys):
    for bad in ("-1", str(2**64)):
        with pytest.raises(SystemExit):
            quickstart.parse_args(["--seed", bad])
        assert "--seed: must be an integer in [0, 2**64)" in capsys.readouterr().err


def test_feature_penalty_refuses_a_single_training_example(capsys):
    """One example has no spread: every run crashed at its results (min() of nothing)."""
    with example_module("feature_penalty") as module, pytest.raises(SystemExit):
        module.parse_args(["--n-train", "1"])
    assert "--n-train: must be an integer >= 2" in capsys.readouterr().err


def test_results_hold_null_for_a_mean_over_nothing(common, quickstart, tmp_path):
    """--informative 0: the mean penalty of no informative feature was written as NaN, which
    strict JSON readers refuse."""
    out = tmp_path / "run"
    quick(quickstart, out, 2, "--informative", "0")
    text = (out / common.RESULTS_FILE).read_text()
    assert "NaN" not in text
    assert json.loads(text)["mean_l2_informative"] is None
    common.write_json(tmp_path / "x.json", {"a": [1.0, float("inf")], "b": float("nan")})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1.0, None], "b": None}


def test_a_progress_file_whose_invocations_are_not_records_is_refused(quickstart, tmp_path):
    """It ended in a TypeError ('int' object is not iterable)."""
    out = tmp_path / "run"
    quick(quickstart, out, 10)
    progress = out / "progress.json"
    saved = json.loads(progress.read_text())
    saved["invocations"] = 5
    progress.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="not the progress file of an example run"):
        quick(quickstart, out, 20)


def test_run_refuses_an_unwritable_checkpoint_before_its_first_step(tmp_path):
    """A checkpoint under a file was found at the first save (checkpoint_every steps later),
    its steps lost; now before any step."""
    from problems import ridge, ridge_ll, ridge_ul

    from bilevel.ll import GradientDescent
    from bilevel.ul import Reverse

    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=2)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.1)
    problem = BilevelProblem(ll, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model), optimizer)
    (tmp_path / "a_file").write_text("")
    drawn = []

    def data(step):
        drawn.append(step)
        return p.train, p.val

    with pytest.raises(OSError, match=r"cannot write a checkpoint at .*No UL step was taken"):
        problem.run(data, 5, checkpoint=tmp_path / "a_file" / "ck.pt", checkpoint_every=3)
    assert drawn == [] and problem.step_count == 0

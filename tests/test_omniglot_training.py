"""examples/omniglot.py: hypergradients of every method, a short meta-training run on the real
data, and exact resume from OUT/checkpoint.pt."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
from example_modules import example_module

from bilevel import BilevelProblem

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
METHODS = [
    ("maml", None),
    ("fomaml", None),
    ("imaml", None),
    ("hyperrep", "reverse"),
    ("hyperrep", "truncated"),
    ("hyperrep", "implicit"),
]


@pytest.fixture(scope="module")
def example():
    """examples/omniglot.py as a module (its sibling ``_common`` importable)."""
    with example_module("omniglot") as module:
        yield module


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions run fastest on one thread (and the example's --threads changes the
    process-wide setting): restore it afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_batch(tasks=2, ways=5, shots=1, queries=3):
    g = torch.Generator().manual_seed(0)

    def part(k):
        x = torch.rand(tasks, ways * k, 1, 28, 28, generator=g)
        y = torch.arange(ways).repeat_interleave(k).expand(tasks, -1).contiguous()
        return x, y

    return {"train": part(shots), "test": part(queries)}


@pytest.mark.parametrize(("method", "ul_method"), METHODS)
def test_hypergradient_reaches_every_ul_parameter(example, method, ul_method):
    argv = ["--method", method, "--hidden", "8", "--inner-steps", "3", "--inner-lr", "0.1"]
    if ul_method:
        argv += ["--ul-method", ul_method]
    if method == "imaml":  # a proximal term strong enough for a positive definite LL Hessian
        argv += ["--reg", "20", "--inner-lr", "0.02"]
    args = example.parse_args(argv)
    exp = example.Experiment(args, torch.device("cpu"))
    names = [n for n, p in exp.ul_model.named_parameters()]
    expected_ul = "conv trunk" if method == "hyperrep" else "whole network"
    assert (exp.ul_model is exp.ll_model) == (expected_ul == "whole network")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a CG that met negative curvature
        # 3 LL steps are not a stationary LL: Implicit says so, rightly, but it is not the
        # point here
        warnings.filterwarnings("ignore", message="The LL gradient at the auxiliary model")
        grads = exp.problem.meta_hypergradient(_random_batch())
    assert len(grads) == len(names)
    for name, g in zip(names, grads, strict=True):
        assert torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, f"{method}/{args.ul_method}: no hypergradient for {name}"
    assert len(exp.query_accuracy) == 2  # the UL objective saw both tasks


def test_method_and_ul_method_must_agree(example):
    assert example.parse_args(["--method", "maml"]).ul_method == "reverse"
    assert example.parse_args(["--method", "fomaml"]).ul_method == "first_order"
    assert example.parse_args(["--method", "hyperrep"]).ul_method == "reverse"
    with pytest.raises(SystemExit):
        example.parse_args(["--method", "maml", "--ul-method", "implicit"])


def _run(example, out, data_root, cache, *extra):
    argv = ["--data-root", str(data_root), "--cache-dir", str(cache), "--out", str(out)]
    return example.main([*argv, "--no-progress", "--threads", "1", *extra])


def test_short_meta_training_beats_chance(example, omniglot, data_root, data_cache_dir, tmp_path):
    """A few dozen MAML steps of a small network: well above chance (20%) on meta-test tasks."""
    results = _run(
        example,
        tmp_path,
        data_root,
        data_cache_dir,
        *("--method", "maml", "--hidden", "16", "--meta-batch", "4", "--query", "5"),
        *("--meta-steps", "40", "--meta-lr", "5e-3", "--eval-every", "40", "--val-tasks", "10"),
        *("--eval-tasks", "60"),
    )
    assert results["meta_steps"] == 40 and results["test_tasks"] == 60
    assert results["test_accuracy"] > 0.4, results
    assert 0 < results["test_ci95"] < 0.06
    for name in ("checkpoint.pt", "best.pt", "log.csv", "curve.png", "results.json"):
        assert (tmp_path / name).exists(), name
    assert example.read_best(tmp_path / "best.pt")["step"] == results["best_step"] == 40
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("test_accuracy", "test_ci95", "meta_steps", "train_seconds", "settings"):
        assert key in saved
    assert saved["settings"]["method"] == "maml" and "torch" in saved["hardware"]


def rows(folder):
    """log.csv without the timings."""
    with open(folder / "log.csv") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


TINY = (
    *("--hidden", "8", "--meta-batch", "2", "--query", "2", "--eval-every", "2"),
    *("--log-every", "1", "--val-tasks", "2", "--eval-tasks", "2", "--eval-query", "2"),
)


@pytest.mark.parametrize("method", ["maml", "hyperrep"])
def test_resume_continues_bitwise(
    example, omniglot, data_root, data_cache_dir, tmp_path, monkeypatch, method
):
    """4 meta-steps in one invocation, or interrupted during step 4 (last checkpoint at step 2)
    and the same command run again: the same UL model, optimizer state and log, bit for bit."""
    args = ("--method", method, *TINY, "--meta-steps", "4")
    _run(example, tmp_path / "once", data_root, data_cache_dir, *args)
    calls = 0
    meta_step = BilevelProblem.meta_step

    def interrupted(self, batch):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        return meta_step(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(BilevelProblem, "meta_step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _run(example, tmp_path / "twice", data_root, data_cache_dir, *args)
    assert len(rows(tmp_path / "twice")) == 3  # step 3 was logged, not checkpointed
    resumed = _run(example, tmp_path / "twice", data_root, data_cache_dir, *args)
    assert resumed["resumed_from_step"] == 2 and resumed["meta_steps"] == 4
    once = torch.load(tmp_path / "once" / "checkpoint.pt", weights_only=True)
    twice = torch.load(tmp_path / "twice" / "checkpoint.pt", weights_only=True)
    assert once["step"] == twice["step"] == 4
    assert once["ul_model"].keys() == twice["ul_model"].keys()
    for key, value in once["ul_model"].items():
        assert torch.equal(value, twice["ul_model"][key]), key
    for a, b in zip(
        once["ul_optimizer"]["state"].values(),
        twice["ul_optimizer"]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)

    assert rows(tmp_path / "once") == rows(tmp_path / "twice")
    assert [int(r["step"]) for r in rows(tmp_path / "twice")] == [1, 2, 3, 4]
    # another experiment in the same folder is refused
    with pytest.raises(SystemExit):
        _run(example, tmp_path / "twice", data_root, data_cache_dir, *args, "--reg", "1.0")

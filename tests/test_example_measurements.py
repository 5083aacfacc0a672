"""The numbers the examples write to results.json (and from there to docs/omniglot.md and
docs/hyper_cleaning.md), checked against hand computations: the 95% confidence interval, the
fixed meta-test tasks, model selection on validation tasks, the CPU budget across resumed
invocations, --max-minutes, refused resumes, what results.json says ran, and the
hyper-cleaning and feature-penalty metrics.

The Omniglot runs use a small synthetic stand-in for the data set (``FakeOmniglot``: the
example takes any object with ``split(name).images``) and, where time matters, a fake clock
that only the patched work advances (a meta-step, a validation), so that budgets and stops are
exact. The MNIST examples run on synthetic 784-feature data through ``_common.mnist_split``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from example_modules import example_module

from bilevel import BilevelProblem
from bilevel.data import TaskSampler

# --- Omniglot: the synthetic data set, the fake clock, recorded evaluations -----------------

SPLIT_CLASSES = {"train": 9, "val": 5, "test": 6}


class FakeSplit:
    """What the example reads of an ``OmniglotSplit``: its name and ``images``."""

    def __init__(self, name: str, images: np.ndarray) -> None:
        self.name = name
        self.images = images


class FakeOmniglot:
    """Stand-in for ``bilevel.data.Omniglot``: per split, classes of 20 noisy 28x28 copies of
    a random pattern (uint8), the same for every instance."""

    def __init__(self, root=None, cache_dir=None, progress=True) -> None:
        pass

    def split(self, name: str) -> FakeSplit:
        rng = np.random.default_rng([7, list(SPLIT_CLASSES).index(name)])
        n = SPLIT_CLASSES[name]
        base = rng.integers(0, 256, (n, 1, 28, 28))
        noise = rng.integers(-60, 61, (n, 20, 28, 28))
        return FakeSplit(name, np.clip(base + noise, 0, 255).astype(np.uint8))


class NamedSampler(TaskSampler):
    """``TaskSampler`` that remembers which split it samples."""

    def __init__(self, images, *args, **kwargs) -> None:
        super().__init__(images, *args, **kwargs)
        self.split_name = images.name


TINY = (
    *("--ways", "3", "--shots", "1", "--query", "2", "--eval-query", "3", "--hidden", "4"),
    *("--meta-batch", "2", "--inner-steps", "1", "--inner-lr", "0.2", "--meta-lr", "0.01"),
    *("--val-tasks", "3", "--eval-tasks", "5", "--eval-every", "2", "--log-every", "1"),
    *("--no-progress", "--threads", "1", "--checkpoint-minutes", "0"),
)
STEP_CPU, STEP_WALL = 6.0, 10.0  # fake seconds per meta-step
VAL_CPU, TEST_CPU = 1000.0, 5000.0  # fake CPU seconds per validation / test evaluation


class Clock:
    """The fake clock: ``process_time`` and ``perf_counter`` move only when told."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def new_process(self) -> None:
        """A new invocation is a new process: its CPU clock starts again."""
        self.cpu = 0.0


@pytest.fixture(scope="module")
def example():
    """examples/omniglot.py as a module."""
    with example_module("omniglot") as module:
        yield module


@pytest.fixture
def om(example, monkeypatch):
    """The Omniglot example on the synthetic data set, without plots, with every evaluation
    recorded in ``om.calls`` (split, seed, tasks, queries, step, the UL model's state, the
    accuracies). ``om.val_acc`` (step -> accuracy), when set, replaces the validation
    accuracies; ``om.clock`` (a :class:`Clock`), when set, is the scripts' clock."""
    monkeypatch.setattr(example, "Omniglot", FakeOmniglot)
    monkeypatch.setattr(example, "TaskSampler", NamedSampler)
    monkeypatch.setattr(example._common, "pyplot", lambda: None)
    state = types.SimpleNamespace(calls=[], val_acc=None, clock=None, example=example)
    evaluate = example.Experiment.evaluate

    def recorded(exp, sampler, tasks, progress=False):
        kind = sampler.split_name
        snapshot = {k: v.detach().clone() for k, v in exp.ul_model.state_dict().items()}
        if kind == "val" and state.val_acc is not None:
            result = torch.full((tasks,), state.val_acc[exp.problem.step_count])
        else:
            result = evaluate(exp, sampler, tasks, progress)
        if state.clock is not None:
            state.clock.cpu += VAL_CPU if kind == "val" else TEST_CPU
        state.calls.append(
            {
                "split": kind,
                "seed": sampler.seed,
                "tasks": tasks,
                "shape": (sampler.ways, sampler.shots, sampler.queries),
                "step": exp.problem.step_count,
                "state": snapshot,
                "result": result,
            }
        )
        return result

    monkeypatch.setattr(example.Experiment, "evaluate", recorded)
    return state


@pytest.fixture
def clock(om, example, monkeypatch):
    """The fake clock, for the example and ``_common`` (``time`` of both modules), advanced
    by STEP_CPU / STEP_WALL per meta-step and VAL_CPU per validation."""
    fake = Clock()
    om.clock = fake
    names = {k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    module = types.SimpleNamespace(
        **{**names, "process_time": lambda: fake.cpu, "perf_counter": lambda: fake.wall}
    )
    monkeypatch.setattr(example, "time", module)
    monkeypatch.setattr(example._common, "time", module)
    meta_step = BilevelProblem.meta_step

    def costly(self, batch):
        loss = meta_step(self, batch)
        fake.cpu += STEP_CPU
        fake.wall += STEP_WALL
        return loss

    monkeypatch.setattr(BilevelProblem, "meta_step", costly)
    return fake


def run(example, out, *extra):
    return example.main(["--out", str(out), *TINY, *extra])


def ul_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["ul_model"]


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_checkpoint(a: Path, b: Path) -> None:
    """Bitwise the same step, UL model and UL optimizer state."""
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"]
    assert same_state(ca["ul_model"], cb["ul_model"])
    for sa, sb in zip(
        ca["ul_optimizer"]["state"].values(), cb["ul_optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def hand_mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and 1.96 * (sample standard deviation, n - 1) / sqrt(n), in plain Python."""
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, 1.96 * std / math.sqrt(n)


# --- the confidence interval ------------------------------------------------------------------


def test_mean_ci95_is_196_sample_std_over_sqrt_n(example):
    """600 per-task accuracies (multiples of 1/75, float32 as the example makes them): the
    half-width is 1.96 s / sqrt(n) with the n - 1 standard deviation (n would differ by
    sqrt(600/599) - 1 = 8e-4, far above the tolerance)."""
    g = torch.Generator().manual_seed(0)
    values = (torch.randint(40, 76, (600,), generator=g) / 75).float()
    mean, half = example.mean_ci95(values)
    want_mean, want_half = hand_mean_ci95([float(v) for v in values])
    assert mean == pytest.approx(want_mean, rel=1e-12)
    assert half == pytest.approx(want_half, rel=1e-12)
    assert example.mean_ci95(torch.tensor([0.8])) == pytest.approx((0.8, 0.0), rel=1e-7)


# --- evaluation on one task: the settings the page states ---------------------------------------


def _hand_adapted_logits(exp, method, xs, ys, xq, steps, lr):
    """The query logits after ``steps`` gradient steps on the support loss, by hand."""
    if method == "hyperrep":
        with torch.no_grad():
            fs, fq = exp.ul_model(xs), exp.ul_model(xq)
        head = {k: torch.zeros_like(v) for k, v in exp.ll_model.named_parameters()}
        for _ in range(steps):
            w = {k: v.requires_grad_() for k, v in head.items()}
            loss = F.cross_entropy(fs @ w["weight"].T + w["bias"], ys)
            loss = loss + 0.5 * exp.args.head_l2 * sum((v**2).sum() for v in w.values())
            grads = torch.autograd.grad(loss, list(w.values()))
            head = {k: (v - lr * g).detach() for (k, v), g in zip(w.items(), grads, strict=True)}
        return fq @ head["weight"].T + head["bias"]
    net = exp.ll_model
    theta = {k: v.detach() for k, v in net.named_parameters()}
    rates = [r.detach() for r in exp.ul_model.lr] if method == "metasgd" else [lr] * len(theta)
    w = dict(theta)
    for _ in range(steps):
        w = {k: v.requires_grad_() for k, v in w.items()}
        loss = F.cross_entropy(torch.func.functional_call(net, w, xs), ys)
        if method == "imaml":
            loss = loss + 0.5 * exp.args.reg * sum(((w[k] - theta[k]) ** 2).sum() for k in w)
        grads = torch.autograd.grad(loss, list(w.values()))
        w = {k: (v - r * g).detach() for (k, v), g, r in zip(w.items(), grads, rates, strict=True)}
    with torch.no_grad():
        return torch.func.functional_call(net, w, xq)


@pytest.mark.parametrize("method", ["maml", "imaml", "metasgd", "hyperrep"])
def test_task_accuracy_adapts_eval_inner_steps_on_support_then_scores_the_query(example, method):
    """Evaluation on a task, in float64: --eval-inner-steps steps (here 2, the training LL
    has 1) of --inner-lr on the support loss (for iMAML with the proximal term; Meta-SGD with
    its learned step sizes; the hyper-representation a zero head on fixed features), then the
    accuracy on the query set."""
    argv = ["--method", method, "--hidden", "4", "--ways", "3", "--inner-steps", "1"]
    args = example.parse_args([*argv, "--eval-inner-steps", "2", "--inner-lr", "0.3"])
    torch.manual_seed(1)
    exp = example.Experiment(args, torch.device("cpu"))
    exp.ul_model.double()
    exp.ll_model.double()
    if method == "metasgd":
        with torch.no_grad():
            for rate in exp.ul_model.lr:
                rate.copy_(torch.rand_like(rate) * 0.5)
    g = torch.Generator().manual_seed(2)
    xs = torch.rand(3, 1, 28, 28, generator=g, dtype=torch.float64)
    xq = torch.rand(12, 1, 28, 28, generator=g, dtype=torch.float64)
    ys, yq = torch.arange(3), torch.arange(3).repeat_interleave(4)
    want = _hand_adapted_logits(exp, method, xs, ys, xq, 2, 0.3)
    accuracy = exp.task_accuracy({"train": (xs, ys), "test": (xq, yq)})
    correct = int((want.argmax(-1) == yq).sum())
    assert accuracy.item() == pytest.approx(correct / 12, abs=1e-7)
    # batch norm keeps no running statistics: the batch's own, in train and eval mode alike
    norms = [m for m in exp.ul_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.track_running_stats for m in norms)
    exp.ul_model.eval()
    exp.ll_model.eval()
    assert torch.equal(exp.task_accuracy({"train": (xs, ys), "test": (xq, yq)}), accuracy)
    if method == "hyperrep":
        with torch.no_grad():
            xs, xq = exp.ul_model(xs), exp.ul_model(xq)
    adapted = exp.adapt.optimize(xs, ys)
    with torch.no_grad():
        got = adapted(xq)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --- the meta-test tasks -------------------------------------------------------------------------


def test_meta_test_tasks_are_the_same_for_every_method_seed_and_budget(om, example, tmp_path):
    """Two runs that differ in method, seed, meta-steps and budget: both are tested on tasks
    0 .. eval_tasks - 1 of the "test" split with seed 2 and --eval-query queries, and validated
    on tasks of the "val" split with seed 1; meta-training samples the "train" split with
    --seed. The tasks themselves are then identical."""
    run(example, tmp_path / "a", "--method", "maml", "--meta-steps", "2")
    first = list(om.calls)
    om.calls.clear()
    more = ("--seed", "5", "--meta-steps", "3", "--budget-cpu-minutes", "100")
    run(example, tmp_path / "b", "--method", "fomaml", *more)
    for calls in (first, om.calls):
        *vals, test = calls
        assert test["split"] == "test" and test["seed"] == example.TEST_SEED == 2
        assert test["tasks"] == 5 and test["shape"] == (3, 1, 3)
        assert vals and all(v["split"] == "val" and v["seed"] == 1 for v in vals)
        assert all(v["tasks"] == 3 and v["shape"] == (3, 1, 3) for v in vals)
    split = FakeOmniglot().split("test")
    a, b = (NamedSampler(split, 3, 1, 3, seed=c[-1]["seed"]) for c in (first, om.calls))
    for i in range(5):
        for key in ("train", "test"):
            pairs = zip(a.task(i)[key], b.task(i)[key], strict=True)
            assert all(torch.equal(u, v) for u, v in pairs)


# --- model selection: best validation accuracy, then best.pt is tested --------------------------

VAL_ACC = {2: 0.75, 4: 0.5, 6: 0.625, 8: 0.6875}


def test_the_model_of_best_validation_accuracy_is_tested_across_a_resume(om, example, tmp_path):
    """Validation accuracies (faked) 0.75, 0.5 in a first invocation of 4 meta-steps, 0.625,
    0.6875 in a second one to 8: the model tested is that of meta-step 2, bitwise, on the
    test tasks, and results.json's test accuracy and CI are the hand-computed mean and
    1.96 s / sqrt(n) of that model's per-task accuracies."""
    om.val_acc = VAL_ACC
    run(example, tmp_path, "--method", "maml", "--meta-steps", "4")
    at_2 = next(c["state"] for c in om.calls if c["split"] == "val" and c["step"] == 2)
    om.calls.clear()
    results = run(example, tmp_path, "--method", "maml", "--meta-steps", "8")
    assert [c["step"] for c in om.calls if c["split"] == "val"] == [6, 8]
    assert [c["split"] for c in om.calls][-1] == "test"
    test_calls = [c for c in om.calls if c["split"] == "test"]
    assert len(test_calls) == 1
    assert same_state(test_calls[0]["state"], at_2)
    assert same_state(ul_state(tmp_path / "best.pt"), at_2)
    assert results["evaluated_model"] == "best" and results["best_step"] == 2
    assert results["best_val_accuracy"] == 0.75 and results["meta_steps"] == 8

    args = example.parse_args([*TINY, "--method", "maml"])
    fresh = example.Experiment(args, torch.device("cpu"))
    fresh.ul_model.load_state_dict(example.read_best(tmp_path / "best.pt")["ul_model"])
    sampler = TaskSampler(FakeOmniglot().split("test"), 3, 1, 3, seed=2)
    values = [float(fresh.task_accuracy(sampler.task(i))) for i in range(5)]
    mean, half = hand_mean_ci95(values)
    assert results["test_tasks"] == 5
    assert results["test_accuracy"] == pytest.approx(mean, rel=1e-12)
    assert results["test_ci95"] == pytest.approx(half, rel=1e-12)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_accuracy"] == results["test_accuracy"]


def test_a_best_model_left_by_another_run_is_not_tested(om, example, tmp_path, monkeypatch):
    """A run's folder from which checkpoint.pt and progress.json were deleted (the cure the
    example prints for a damaged progress.json: "start again: delete checkpoint.pt and
    progress.json") still holds the old run's best.pt. A new run whose meta-training stops
    before its first validation (the LL diverged at meta-step 1) must not test the old run's
    model as its own "best" one."""
    from bilevel.ll import LowerLevelDivergenceError

    run(example, tmp_path, "--method", "maml", "--meta-steps", "2", "--seed", "3")
    (tmp_path / "checkpoint.pt").unlink()
    (tmp_path / "progress.json").unlink()
    om.calls.clear()

    def diverging(self, batch):
        raise LowerLevelDivergenceError("The LL loss grew (test)")

    with monkeypatch.context() as patch:
        patch.setattr(BilevelProblem, "meta_step", diverging)
        results = run(example, tmp_path, "--method", "maml", "--meta-steps", "4")
    assert results["meta_steps"] == 0 and results["best_val_accuracy"] is None
    torch.manual_seed(0)  # the new run's initialization (--seed 0)
    init = example.Experiment(example.parse_args([*TINY, "--method", "maml"]), "cpu")
    assert results["evaluated_model"] == "final", "the old run's best.pt was tested"
    assert same_state(om.calls[-1]["state"], init.ul_model.state_dict())


# --- --budget-cpu-minutes -------------------------------------------------------------------------

BUDGET = ("--method", "maml", "--meta-steps", "1000", "--budget-cpu-minutes", "0.5")  # 30 CPU s


def test_budget_stops_at_the_budget_with_validation_excluded(om, clock, example, tmp_path):
    """6 CPU s per meta-step, 1,000 per validation (every 4 steps, and at the stop): a budget
    of 30 CPU s stops after meta-step 5, not at the next validation (8), and results.json
    counts 30 s of meta-training and 2,030 s with the two validations."""
    results = run(example, tmp_path, *BUDGET, "--eval-every", "4")
    assert results["meta_steps"] == 5
    assert [c["step"] for c in om.calls if c["split"] == "val"] == [4, 5]
    assert results["train_cpu_seconds_without_validation"] == 30.0
    assert results["train_cpu_seconds"] == 30.0 + 2 * VAL_CPU


def test_budget_continues_bitwise_with_a_larger_budget(om, clock, example, tmp_path):
    """18 CPU s then 30 CPU s (the same command with a larger budget) ends where one run with
    30 CPU s does: meta-step 5, bitwise, with 30 CPU s of meta-training counted."""
    once = run(example, tmp_path / "once", *BUDGET)
    clock.new_process()
    short = (*BUDGET[:-1], "0.3")
    first = run(example, tmp_path / "twice", *short)
    assert first["meta_steps"] == 3
    clock.new_process()
    second = run(example, tmp_path / "twice", *BUDGET)
    assert second["resumed_from_step"] == 3
    assert second["meta_steps"] == once["meta_steps"] == 5
    same_checkpoint(tmp_path / "once" / "checkpoint.pt", tmp_path / "twice" / "checkpoint.pt")
    for r in (once, second):
        assert r["train_cpu_seconds_without_validation"] == 5 * STEP_CPU


def test_budget_counts_the_steps_between_the_last_log_record_and_the_checkpoint(
    om, clock, example, tmp_path, monkeypatch
):
    """SIGTERM during meta-step 3 with log records every 2 steps: the checkpoint holds step 3
    (18 CPU s of meta-training). The same command must then stop at the budget, after
    meta-step 5 (30 CPU s), as the uninterrupted run does, and count 6 CPU s per step. The
    CPU time of step 3 must not be dropped because no log record was written at step 3."""
    argv = (*BUDGET, "--log-every", "2")
    once = run(example, tmp_path / "once", *argv)
    assert once["meta_steps"] == 5
    meta_step = BilevelProblem.meta_step
    calls = 0

    def signalled(self, batch):
        nonlocal calls
        calls += 1
        loss = meta_step(self, batch)
        if calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    clock.new_process()
    with monkeypatch.context() as patch:
        patch.setattr(BilevelProblem, "meta_step", signalled)
        with pytest.raises(SystemExit) as stop:
            run(example, tmp_path / "twice", *argv)
    assert stop.value.code == 143
    assert torch.load(tmp_path / "twice" / "checkpoint.pt", weights_only=True)["step"] == 3
    clock.new_process()
    resumed = run(example, tmp_path / "twice", *argv)
    assert resumed["resumed_from_step"] == 3
    assert resumed["meta_steps"] == 5, "the resumed run overran the budget"
    assert resumed["train_cpu_seconds_without_validation"] == 5 * STEP_CPU
    same_checkpoint(tmp_path / "once" / "checkpoint.pt", tmp_path / "twice" / "checkpoint.pt")


def test_the_same_command_after_the_budget_is_reached_takes_no_more_steps(
    om, clock, example, tmp_path
):
    """A run that has spent its budget (stopped after meta-step 5), run again with the same
    command (e.g. after a crash or a SIGTERM during the final test evaluation, which is not
    saved): no meta-step beyond the budget, the same checkpoint, the same result."""
    first = run(example, tmp_path, *BUDGET)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    clock.new_process()
    again = run(example, tmp_path, *BUDGET)
    assert again["meta_steps"] == first["meta_steps"] == 5
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert again["test_accuracy"] == first["test_accuracy"]


# --- --max-minutes --------------------------------------------------------------------------------


def test_max_minutes_chunks_lose_nothing_and_resume_bitwise(om, clock, example, tmp_path):
    """10 wall seconds per meta-step, --max-minutes 0.5 (30 s) per invocation: invocations end
    after meta-steps 4 and 8, the third reaches 10; the end is bitwise the uninterrupted run,
    and the wall time is summed over the invocations (100 s)."""
    argv = ("--method", "maml", "--meta-steps", "10")
    once = run(example, tmp_path / "once", *argv)
    done = []
    for _ in range(3):
        clock.new_process()
        done.append(run(example, tmp_path / "chunks", *argv, "--max-minutes", "0.5"))
    assert [r["meta_steps"] for r in done] == [4, 8, 10]
    assert [r["resumed_from_step"] for r in done] == [0, 4, 8]
    same_checkpoint(tmp_path / "once" / "checkpoint.pt", tmp_path / "chunks" / "checkpoint.pt")
    assert done[-1]["train_seconds"] == once["train_seconds"] == 10 * STEP_WALL
    assert done[-1]["train_cpu_seconds_without_validation"] == 10 * STEP_CPU


# --- resumes with other settings, and what results.json records ------------------------------


def test_a_resume_with_other_settings_is_refused_and_writes_nothing(om, example, tmp_path):
    run(example, tmp_path, "--method", "maml", "--meta-steps", "2")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "run.lock"}
    for other in (
        ("--method", "fomaml"),
        ("--meta-lr", "0.02"),
        ("--ways", "2"),
        ("--eval-query", "2"),
        ("--seed", "1"),
        ("--inner-steps", "2"),
    ):
        argv = ["--out", str(tmp_path), *TINY, "--method", "maml", "--meta-steps", "3", *other]
        with pytest.raises(SystemExit, match="other settings"):
            example.main(argv)
        after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "run.lock"}
        assert after == before, other


def test_results_json_records_the_settings_and_steps_that_ran(om, example, tmp_path):
    argv = ["--method", "fomaml", "--meta-steps", "3", "--eval-inner-steps", "2"]
    results = run(example, tmp_path, *argv)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    args = example.parse_args([*TINY, *argv])
    fixed = example._common.NOT_SETTINGS
    expected = {k: v for k, v in vars(args).items() if k not in fixed or k in example.RESUMABLE}
    assert saved["settings"] == expected
    assert saved["settings"]["eval_inner_steps"] == 2 and saved["settings"]["eval_query"] == 3
    assert (
        saved["meta_steps"]
        == 3
        == torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    )
    assert (saved["method"], saved["ul_method"], saved["ways"], saved["shots"]) == (
        "fomaml",
        "first_order",
        3,
        1,
    )
    assert saved["threads"] == 1 and "1 thread(s)" in saved["hardware"]
    assert saved["date"] and "commit" in saved["git"]


def test_results_json_names_the_hardware_and_code_of_every_invocation(
    om, clock, example, tmp_path, monkeypatch
):
    """A run made in two invocations on two machines (or two checkouts): the first trained
    meta-steps 1-4 on "CPU-A" with commit aaaaaaa, the second 5-8 on "CPU-B" with bbbbbbb.
    results.json (whose numbers the docs publish with the hardware) must say both, not only
    the last one's."""
    argv = ("--method", "maml", "--meta-steps", "8", "--max-minutes", "0.5")
    for cpu, commit in (("CPU-A", "aaaaaaa"), ("CPU-B", "bbbbbbb")):
        monkeypatch.setattr(
            example._common, "hardware", lambda device, cpu=cpu: f"{cpu}, 1 thread(s); torch x"
        )
        monkeypatch.setattr(
            example._common,
            "provenance",
            lambda commit=commit: {"date": "today", "git": {"commit": commit, "dirty": False}},
        )
        clock.new_process()
        results = run(example, tmp_path, *argv)
    assert results["meta_steps"] == 8 and results["resumed_from_step"] == 4
    text = (tmp_path / "results.json").read_text()
    assert "CPU-B" in text and "bbbbbbb" in text
    assert "CPU-A" in text, "the first invocation's hardware is not recorded"
    assert "aaaaaaa" in text, "the first invocation's commit is not recorded"


# --- MNIST examples: hyper-cleaning and per-pixel penalties --------------------------------------


def fake_mnist(n_test: int = 80, constant: int = 0):
    """``_common.mnist_split`` on synthetic data: 10 classes around random centroids in 784
    dimensions (``constant`` pixels zero everywhere), centred by the training mean."""

    def split(root, dataset, n_train, n_val, seed):
        g = torch.Generator().manual_seed(100 + seed)
        centroids = torch.randn(10, 784, generator=g) * 0.15

        def draw(n):
            y = torch.randint(0, 10, (n,), generator=g)
            x = centroids[y] + 0.3 * torch.randn(n, 784, generator=g)
            x[:, :constant] = 0.0
            return x, y

        (x, y), val, test = draw(n_train), draw(n_val), draw(n_test)
        mean = x.mean(0)
        return {
            "train": (x - mean, y),
            "val": (val[0] - mean, val[1]),
            "test": (test[0] - mean, test[1]),
        }

    return split


def accuracy_bounds(logits: torch.Tensor, y: torch.Tensor, margin: float = 1e-4):
    """The accuracy of float64 ``logits`` as a range: a prediction whose two largest logits
    are within ``margin`` may round either way in float32."""
    top2 = logits.topk(2, dim=1).values
    close = (top2[:, 0] - top2[:, 1]) < margin
    right = logits.argmax(1) == y
    n = len(y)
    return int((right & ~close).sum()) / n, int((right | close).sum()) / n


def hand_softmax_regression(x, y, weights, l2, lr, steps):
    """Zero-initialized 10-class linear classifier, ``steps`` of gradient descent on
    ``sum_i w_i CE_i / sum_i w_i + l2/2 ||W||^2`` (or ``CE mean + penalty(W)`` for a callable
    ``l2``), in float64."""
    x, w_ex = x.double(), None if weights is None else weights.double()
    W = torch.zeros(10, x.shape[1], dtype=torch.float64)
    b = torch.zeros(10, dtype=torch.float64)
    for _ in range(steps):
        W.requires_grad_()
        b.requires_grad_()
        ce = F.cross_entropy(x @ W.T + b, y, reduction="none")
        if w_ex is None:
            loss = ce.mean() + l2(W)
        else:
            loss = (w_ex * ce).sum() / w_ex.sum() + 0.5 * l2 * (W**2).sum()
        gW, gb = torch.autograd.grad(loss, [W, b])
        W, b = (W - lr * gW).detach(), (b - lr * gb).detach()
    return lambda z: z.double() @ W.T + b


def within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] - 1e-7 <= value <= bounds[1] + 1e-7


def test_hyper_cleaning_metrics_match_a_hand_computation(tmp_path, monkeypatch):
    """Half the training labels (exactly round(0.5 n)) replaced by another class, validation
    and test labels untouched; precision, recall and F1 of the examples whose learned weight
    is below 0.5, the mean weights, and the test accuracies of the final, baseline (all
    weights 1) and oracle (clean examples only) classifiers, recomputed by hand from the
    checkpoint's weights on the clean test set."""
    with example_module("hyper_cleaning") as hc:
        monkeypatch.setattr(hc._common, "mnist_split", fake_mnist())
        monkeypatch.setattr(hc._common, "pyplot", lambda: None)
        seen = {}
        corrupt = hc.corrupt_labels

        def recorded(labels, fraction, classes, seed):
            seen["clean"] = labels.clone()
            seen["noisy"], seen["mask"] = corrupt(labels, fraction, classes, seed)
            return seen["noisy"], seen["mask"]

        monkeypatch.setattr(hc, "corrupt_labels", recorded)
        argv = ["--out", str(tmp_path), "--method", "reverse", "--n-train", "60", "--n-val", "40"]
        argv += ["--ul-steps", "3", "--ll-steps", "4", "--final-steps", "9", "--ll-lr", "0.5"]
        argv += ["--ul-lr", "0.5", "--log-every", "1", "--no-progress", "--threads", "1"]
        results = hc.main(argv)
    data = fake_mnist()(None, "mnist", 60, 40, 0)
    x, y_clean = data["train"]
    x_test, y_test = data["test"]
    assert torch.equal(seen["clean"], y_clean)
    noisy, mask = seen["noisy"], seen["mask"]
    assert int((noisy != y_clean).sum()) == 30 and torch.equal(noisy != y_clean, mask)

    weights = torch.sigmoid(ul_state(tmp_path / "checkpoint.pt")["logits"]).double()
    flagged = (weights < 0.5).tolist()
    corrupted = mask.tolist()
    tp = sum(f and c for f, c in zip(flagged, corrupted, strict=True))
    precision, recall = tp / max(sum(flagged), 1), tp / sum(corrupted)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    assert 0 < sum(flagged) < 60, "the check needs some examples flagged and some not"
    assert results["precision"] == pytest.approx(precision, rel=1e-12)
    assert results["recall"] == pytest.approx(recall, rel=1e-12)
    assert results["f1"] == pytest.approx(f1, rel=1e-12)
    assert results["mean_weight_clean"] == pytest.approx(float(weights[~mask].mean()), rel=1e-6)
    assert results["mean_weight_corrupted"] == pytest.approx(float(weights[mask].mean()), rel=1e-6)

    def test_accuracy(w):
        net = hand_softmax_regression(x, noisy, w, 1e-2, 0.5, 9)
        return accuracy_bounds(net(x_test), y_test)

    final, base, oracle = (test_accuracy(w) for w in (weights, torch.ones(60), (~mask).double()))
    assert within(results["test_acc"], final), (results["test_acc"], final)
    assert within(results["baseline"]["test_acc"], base), (results["baseline"], base)
    assert within(results["oracle"]["test_acc"], oracle), (results["oracle"], oracle)
    assert oracle != base, "the check needs the oracle and the baseline to differ"
    assert results["settings"]["corrupt"] == 0.5 and results["ul_steps"] == 3


def test_feature_penalty_selects_the_single_penalty_on_validation_and_reports_test(
    tmp_path, monkeypatch
):
    """The single-penalty grid: each value's validation and test accuracy by hand; the "best"
    one is the best on validation (not on test); the final test accuracy is that of a
    classifier trained with the checkpoint's learned per-pixel penalties; pixels constant
    on the training subset are not "varying"."""
    split = fake_mnist(constant=30)
    with example_module("feature_penalty") as fp:
        monkeypatch.setattr(fp._common, "mnist_split", split)
        monkeypatch.setattr(fp._common, "pyplot", lambda: None)
        argv = ["--out", str(tmp_path), "--method", "reverse", "--n-train", "50", "--n-val", "40"]
        argv += ["--ul-steps", "2", "--ll-steps", "4", "--final-steps", "8", "--ll-lr", "0.5"]
        argv += ["--log-every", "1", "--no-progress", "--threads", "1"]
        results = fp.main(argv)
    data = split(None, "mnist", 50, 40, 0)
    (x, y), (xv, yv), (xt, yt) = data["train"], data["val"], data["test"]
    grid = results["single_penalty_grid"]
    assert list(grid) == ["1e-05", "0.0001", "0.001", "0.01", "0.1", "1"]
    for key, got in grid.items():
        l2 = float(key)
        net = hand_softmax_regression(x, y, None, lambda W, l2=l2: 0.5 * l2 * (W**2).sum(), 0.5, 8)
        assert within(got["val_acc"], accuracy_bounds(net(xv), yv)), key
        assert within(got["test_acc"], accuracy_bounds(net(xt), yt)), key
    best = results["best_single_penalty"]
    assert best["val_acc"] == max(g["val_acc"] for g in grid.values())
    assert grid[f"{best['l2']:g}"]["test_acc"] == best["test_acc"]

    learned = ul_state(tmp_path / "checkpoint.pt")["log_l2"].double().exp()
    net = hand_softmax_regression(
        x, y, None, lambda W: 0.5 * (learned * (W**2).sum(0)).sum(), 0.5, 8
    )
    assert within(results["test_acc"], accuracy_bounds(net(xt), yt))
    assert within(results["val_acc"], accuracy_bounds(net(xv), yv))
    assert results["varying_pixels"] == 784 - 30
    assert results["learned_l2"]["max"] == pytest.approx(float(learned[30:].max()), rel=1e-6)


def test_hyper_cleaning_results_name_the_hardware_of_every_invocation(
    tmp_path, monkeypatch, capsys
):
    """As for Omniglot: two invocations (UL steps 1-2 on "CPU-A", 3-4 on "CPU-B") and
    results.json names only the second machine. The second says that it resumes, also with
    --no-progress (it said nothing: only results.json's resumed_from_step told)."""
    with example_module("hyper_cleaning") as hc:
        monkeypatch.setattr(hc._common, "mnist_split", fake_mnist())
        monkeypatch.setattr(hc._common, "pyplot", lambda: None)
        argv = ["--out", str(tmp_path), "--method", "reverse", "--n-train", "30", "--n-val", "20"]
        argv += ["--ll-steps", "2", "--final-steps", "2", "--log-every", "1", "--no-progress"]
        for steps, cpu in (("2", "CPU-A"), ("4", "CPU-B")):
            monkeypatch.setattr(hc._common, "hardware", lambda device, cpu=cpu: cpu)
            results = hc.main([*argv, "--ul-steps", steps])
    assert results["resumed_from_step"] == 2 and results["ul_steps"] == 4
    assert capsys.readouterr().out.count("resuming from UL step 2") == 1
    text = (tmp_path / "results.json").read_text()
    assert "CPU-B" in text
    assert "CPU-A" in text, "the first invocation's hardware is not recorded"

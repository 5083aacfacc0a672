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
from bilevel.ll import fast_weights

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
METHODS = [
    ("maml", None),
    ("fomaml", None),
    ("imaml", None),
    ("hyperrep", "reverse"),
    ("hyperrep", "truncated"),
    ("hyperrep", "implicit"),
]
TINY_NET = ("--hidden", "8", "--inner-steps", "3", "--inner-lr", "0.1")


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


def _double(exp):
    """The experiment's models in float64 (exact comparisons)."""
    exp.ul_model.double()
    exp.ll_model.double()
    return {
        k: tuple(t.double() if t.is_floating_point() else t for t in v)
        for k, v in _random_batch().items()
    }


def test_metasgd_at_uniform_step_sizes_is_maml_and_learns_them(example):
    """Meta-SGD's step sizes start at --inner-lr: its meta-gradient of the initialization is
    then MAML's, and its step sizes' gradient is, for one step from theta,
    dL/d(alpha) = -grad f(theta) * grad L(theta - alpha grad f(theta)) (elementwise)."""
    one_step = ("--hidden", "8", "--inner-steps", "1", "--inner-lr", "0.1")
    torch.manual_seed(0)
    meta = example.Experiment(example.parse_args(["--method", "metasgd", *one_step]), "cpu")
    maml = example.Experiment(example.parse_args(["--method", "maml", *one_step]), "cpu")
    maml.ul_model.load_state_dict(meta.ll_model.state_dict())
    batch = _double(meta)
    _double(maml)
    with torch.no_grad():  # 0.1 exactly, not its float32 rounding
        for lr in meta.ul_model.lr:
            lr.fill_(0.1)
    assert meta.ul_model is not meta.ll_model and meta.ul_model.net is meta.ll_model
    grads = meta.problem.meta_hypergradient(batch)
    names = [n for n, _ in meta.ul_model.named_parameters()]
    init = [g for n, g in zip(names, grads, strict=True) if n.startswith("net.")]
    lrs = [g for n, g in zip(names, grads, strict=True) if n.startswith("lr.")]
    for a, b in zip(init, maml.problem.meta_hypergradient(batch), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # by hand, task by task, with torch.func
    net = maml.ul_model
    theta = dict(net.named_parameters())
    expected = [torch.zeros_like(p) for p in theta.values()]
    for t in range(2):
        xs, ys = batch["train"][0][t], batch["train"][1][t]
        xq, yq = batch["test"][0][t], batch["test"][1][t]
        support = torch.nn.functional.cross_entropy(torch.func.functional_call(net, theta, xs), ys)
        g_support = torch.autograd.grad(support, list(theta.values()))
        adapted = {
            k: (v - 0.1 * g).detach().requires_grad_()
            for (k, v), g in zip(theta.items(), g_support, strict=True)
        }
        query = torch.nn.functional.cross_entropy(torch.func.functional_call(net, adapted, xq), yq)
        g_query = torch.autograd.grad(query, list(adapted.values()))
        for e, gs, gq in zip(expected, g_support, g_query, strict=True):
            e -= gs * gq / 2
    for got, want in zip(lrs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in lrs)


def test_metasgd_with_as_many_ways_as_inner_steps_steps_per_element(example):
    """--ways 5 --inner-steps 5: the head's bias and its step sizes have shape (5,), which
    also reads as a schedule of 5 LL steps; the example marks Meta-SGD's step sizes
    per-element (bilevel.ll.PerElement). Its meta-gradient and its evaluation's adapted
    weights are those of 5 hand-written per-element steps ``w <- w - alpha * grad``."""
    argv = ["--method", "metasgd", "--ways", "5", "--inner-steps", "5", "--hidden", "4"]
    torch.manual_seed(0)
    meta = example.Experiment(example.parse_args(argv), "cpu")
    batch = _double(meta)
    with torch.no_grad():  # distinct step sizes: a per-step reading would differ
        for lr in meta.ul_model.lr:
            lr.copy_(0.02 + 0.08 * torch.rand_like(lr))
    net = meta.ll_model
    theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    alphas = [lr.detach().clone().requires_grad_() for lr in meta.ul_model.lr]
    assert alphas[-1].shape == (5,)
    ce = torch.nn.functional.cross_entropy

    def adapt(xs, ys):
        w = dict(theta)
        for _ in range(5):
            g = torch.autograd.grad(
                ce(torch.func.functional_call(net, w, xs), ys), list(w.values()), create_graph=True
            )
            steps = zip(w.items(), alphas, g, strict=True)
            w = {k: v - a * gi for (k, v), a, gi in steps}
        return w

    expected = [torch.zeros_like(v) for v in [*theta.values(), *alphas]]
    for t in range(2):
        w = adapt(batch["train"][0][t], batch["train"][1][t])
        query = ce(torch.func.functional_call(net, w, batch["test"][0][t]), batch["test"][1][t])
        grads = torch.autograd.grad(query, [*theta.values(), *alphas])
        for e, g in zip(expected, grads, strict=True):
            e += g / 2
    grads = meta.problem.meta_hypergradient(batch)
    names = [n for n, _ in meta.ul_model.named_parameters()]
    order = [f"net.{k}" for k in theta] + [f"lr.{i}" for i in range(len(alphas))]
    by_name = dict(zip(names, grads, strict=True))
    for name, want in zip(order, expected, strict=True):
        torch.testing.assert_close(by_name[name], want, rtol=1e-9, atol=1e-12, msg=name)
    # the evaluation's LL (5 steps, as --eval-inner-steps defaults to --inner-steps)
    xs, ys = batch["train"][0][0], batch["train"][1][0]
    adapted = meta.adapt.optimize(xs, ys)
    for got, want in zip(fast_weights(adapted), adapt(xs, ys).values(), strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-13)


def test_reptile_moves_towards_weights_adapted_on_support_and_query(example):
    """Reptile's direction is theta - w_T, w_T from GD on the support and query images
    together (the example concatenates them), averaged over the tasks."""
    torch.manual_seed(0)
    exp = example.Experiment(example.parse_args(["--method", "reptile", *TINY_NET]), "cpu")
    assert exp.args.meta_optimizer == "sgd" and exp.args.meta_lr == 1.0
    batch = _double(exp)
    joined = {
        "train": tuple(torch.cat(p, 1) for p in zip(*batch.values(), strict=True)),
        "test": batch["test"],
    }
    grads = exp.problem.meta_hypergradient(joined)
    net = exp.ll_model
    theta = {k: v.detach() for k, v in net.named_parameters()}
    expected = [torch.zeros_like(v) for v in theta.values()]
    for t in range(2):
        w = {k: v.clone().requires_grad_() for k, v in theta.items()}
        for _ in range(3):
            x, y = joined["train"][0][t], joined["train"][1][t]
            loss = torch.nn.functional.cross_entropy(torch.func.functional_call(net, w, x), y)
            g = torch.autograd.grad(loss, list(w.values()))
            w = {
                k: (v - 0.1 * gi).detach().requires_grad_()
                for (k, v), gi in zip(w.items(), g, strict=True)
            }
        for e, v0, v in zip(expected, theta.values(), w.values(), strict=True):
            e += (v0 - v.detach()) / 2
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_bda_at_alpha_zero_is_gradient_descent_and_logs_the_adapted_accuracy(example):
    """--ll bda with alpha 0 is the hyper-representation's GD: the same meta-gradient, and the
    query accuracy logged is the adapted head's (BDA also evaluates the UL objective at each
    of its LL steps; those records are dropped)."""
    torch.manual_seed(0)
    bda = example.Experiment(
        example.parse_args(["--method", "hyperrep", "--ll", "bda", "--bda-alpha", "0", *TINY_NET]),
        "cpu",
    )
    gd = example.Experiment(example.parse_args(["--method", "hyperrep", *TINY_NET]), "cpu")
    gd.ul_model.load_state_dict(bda.ul_model.state_dict())
    batch = _double(bda)
    _double(gd)
    for a, b in zip(
        bda.problem.meta_hypergradient(batch), gd.problem.meta_hypergradient(batch), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.equal(bda.take_query_accuracy(), gd.take_query_accuracy())
    # with alpha > 0 it records at each LL step: only each task's last record is kept
    bda.args.bda_alpha = 0.5
    bda.query_accuracy[:] = [torch.tensor(float(i)) for i in range(2 * (3 + 1))]
    assert bda.take_query_accuracy().item() == (3 + 7) / 2 and not bda.query_accuracy
    with pytest.raises(SystemExit):
        example.parse_args(["--method", "maml", "--ll", "bda"])


def test_method_and_ul_method_must_agree(example):
    assert example.parse_args(["--method", "maml"]).ul_method == "reverse"
    assert example.parse_args(["--method", "fomaml"]).ul_method == "first_order"
    assert example.parse_args(["--method", "hyperrep"]).ul_method == "reverse"
    assert example.parse_args(["--method", "reptile"]).ul_method == "reptile"
    assert example.parse_args(["--method", "metasgd"]).ul_method == "reverse"
    with pytest.raises(SystemExit):
        example.parse_args(["--method", "maml", "--ul-method", "implicit"])


def test_damping_reaches_implicit_and_is_refused_elsewhere(example):
    args = example.parse_args(["--method", "imaml", "--hidden", "8", "--damping", "22"])
    exp = example.Experiment(args, torch.device("cpu"))
    assert exp.problem.ul.damping == 22.0
    for bad in (["--method", "maml", "--damping", "1"], ["--method", "imaml", "--damping", "-1"]):
        with pytest.raises(SystemExit):
            example.parse_args(bad)
    # a run saved before --damping existed has no such setting: it must still resume
    assert example.parse_args(["--method", "imaml"]).damping is None


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


def meta_step_raising(at: int, error: BaseException):
    """``BilevelProblem.meta_step`` that raises ``error`` at its ``at``-th call."""
    calls = 0
    meta_step = BilevelProblem.meta_step

    def step(self, batch):
        nonlocal calls
        calls += 1
        if calls == at:
            raise error
        return meta_step(self, batch)

    return step


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
    with monkeypatch.context() as patch:
        patch.setattr(BilevelProblem, "meta_step", meta_step_raising(4, KeyboardInterrupt()))
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


def test_cpu_budget_stops_meta_training_and_a_larger_one_resumes(
    example, omniglot, data_root, data_cache_dir, tmp_path, monkeypatch
):
    """--budget-cpu-minutes: meta-training stops once its CPU time, validation excluded,
    reaches the budget, and the same command with a larger budget goes on from there. The
    clock is faked: each reading of the process time advances it by one second."""
    clock = iter(range(10**6))
    monkeypatch.setattr(example.time, "process_time", lambda: float(next(clock)))
    args = ("--method", "maml", *TINY, "--meta-steps", "1000")
    first = _run(example, tmp_path, data_root, data_cache_dir, *args, "--budget-cpu-minutes", "0.2")
    # 12 s of budget; the loop reads the clock about twice per step (validation excluded)
    assert 3 <= first["meta_steps"] < 12, first["meta_steps"]
    assert first["train_cpu_seconds_without_validation"] >= 12
    assert first["train_cpu_seconds_without_validation"] < first["train_cpu_seconds"]
    second = _run(
        example, tmp_path, data_root, data_cache_dir, *args, "--budget-cpu-minutes", "0.4"
    )
    assert second["resumed_from_step"] > 0 and second["meta_steps"] > first["meta_steps"]
    assert second["train_cpu_seconds_without_validation"] >= 24


def test_a_diverging_ll_stops_meta_training_and_tests_the_best_model(
    example, omniglot, data_root, data_cache_dir, tmp_path, monkeypatch
):
    """The LL's descent diverging on a task (LowerLevelDivergenceError) ends meta-training:
    the best model so far is tested and results.json says why it stopped."""
    from bilevel.ll import LowerLevelDivergenceError

    diverging = meta_step_raising(3, LowerLevelDivergenceError("The LL loss grew (test)"))
    monkeypatch.setattr(BilevelProblem, "meta_step", diverging)
    results = _run(
        example, tmp_path, data_root, data_cache_dir, "--method", "maml", *TINY, "--meta-steps", "6"
    )
    assert results["meta_steps"] == 2 and results["best_step"] == 2
    assert results["stopped"].startswith("the LL diverged at meta-step 3")
    assert json.loads((tmp_path / "results.json").read_text())["stopped"] == results["stopped"]


def accumulate_raising(failing, error: BaseException):
    """``BilevelProblem._accumulate`` that raises ``error`` at the calls in ``failing`` (1 is
    the first; all calls when ``failing`` is None), inside the step's own error handling."""
    calls = 0
    accumulate = BilevelProblem._accumulate

    def run(self, tasks):
        nonlocal calls
        calls += 1
        if failing is None or calls in failing:
            raise error
        return accumulate(self, tasks)

    return run


def test_on_failed_step_skip_goes_on_and_counts_the_skipped_steps(
    example, omniglot, data_root, data_cache_dir, tmp_path, monkeypatch, capsys
):
    """--on-failed-step skip: a meta-step whose LL diverged is skipped (its result unused)
    and meta-training goes on; the log and results.json count the skipped steps."""
    from bilevel.ll import LowerLevelDivergenceError

    error = LowerLevelDivergenceError("The LL loss grew (test)")
    monkeypatch.setattr(BilevelProblem, "_accumulate", accumulate_raising({3, 4}, error))
    args = ("--method", "maml", *TINY, "--meta-steps", "6", "--on-failed-step", "skip")
    results = _run(example, tmp_path, data_root, data_cache_dir, *args)
    assert results["meta_steps"] == 6 and results["stopped"] is None
    assert results["skipped_steps"] == 2
    assert "skipping a failed meta-step: UL step 2 (reverse): The LL loss grew" in (
        capsys.readouterr().out
    )
    log = rows(tmp_path)
    assert [r["skipped"] for r in log] == ["0", "0", "1", "2", "2", "2"]
    assert [r["loss"] == "" for r in log] == [False, False, True, True, False, False]


def test_on_failed_step_skip_stops_after_too_many_failures_in_a_row(
    example, omniglot, data_root, data_cache_dir, tmp_path, monkeypatch
):
    from bilevel.ll import LowerLevelDivergenceError

    error = LowerLevelDivergenceError("The LL loss grew (test)")
    monkeypatch.setattr(BilevelProblem, "_accumulate", accumulate_raising(None, error))
    args = ("--method", "maml", *TINY, "--meta-steps", "50", "--on-failed-step", "skip")
    results = _run(example, tmp_path, data_root, data_cache_dir, *args)
    in_a_row = example.MAX_SKIPS_IN_A_ROW
    assert results["meta_steps"] == in_a_row and results["skipped_steps"] == in_a_row
    assert results["stopped"].startswith(f"{in_a_row} meta-steps in a row failed")
    assert "The LL loss grew (test)" in results["stopped"]


def test_feature_norm_bounds_the_heads_curvature(example):
    """--feature-norm C: every image's features have norm C, in meta-training and at
    evaluation, and the head's LL Hessian (dense, float64) stays below head_curvature_bound,
    which the parser checks against the LL step."""
    c, l2 = 5.0, 1e-3
    argv = ["--method", "hyperrep", *TINY_NET, "--feature-norm", str(c), "--head-l2", str(l2)]
    exp = example.Experiment(example.parse_args(argv), "cpu")
    batch = _double(exp)
    images, labels = batch["train"][0][0], batch["train"][1][0]
    with torch.no_grad():
        features = exp.features(exp.ul_model, images)
    torch.testing.assert_close(features.norm(dim=1), torch.full((5,), c, dtype=torch.float64))
    shapes = [p.shape for p in exp.ll_model.parameters()]
    sizes = [p.numel() for p in exp.ll_model.parameters()]

    def top_eigenvalue(features, point):
        def objective(flat):
            weight, bias = (t.reshape(s) for t, s in zip(flat.split(sizes), shapes, strict=True))
            logits = torch.nn.functional.linear(features, weight, bias)
            return torch.nn.functional.cross_entropy(logits, labels) + 0.5 * l2 * (flat**2).sum()

        hessian = torch.autograd.functional.hessian(objective, point)
        return torch.linalg.eigvalsh(hessian)[-1].item()

    bound = example.head_curvature_bound(c, l2)
    g = torch.Generator().manual_seed(0)
    for scale in (0.0, 0.1, 1.0):
        point = scale * torch.randn(sum(sizes), generator=g, dtype=torch.float64)
        assert 0 < top_eigenvalue(features, point) <= bound * (1 + 1e-12)
    # the bound is attained: every image with the same features and two classes tied, the
    # others' probabilities ~e^-60 (the head's weights zero, its bias 0, 0, -60, -60, -60)
    point = torch.zeros(sum(sizes), dtype=torch.float64)
    point[-3:] = -60.0
    same = features[:1].expand_as(features)
    assert top_eigenvalue(same, point) == pytest.approx(bound, rel=1e-9)
    grads = exp.problem.meta_hypergradient(batch)  # the normalization is differentiated
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in grads)
    # the task's evaluation adapts the head on normalized features too
    calls = []
    exp.features = lambda trunk, x: (
        calls.append(x.shape) or example.Experiment.features(exp, trunk, x)
    )
    exp.task_accuracy({"train": (images, labels), "test": (images, labels)})
    assert len(calls) == 2
    # a step at which the head's descent could diverge is refused, with the bound
    with pytest.raises(SystemExit):
        example.parse_args(["--method", "hyperrep", "--inner-lr", "0.2", "--feature-norm", "5"])
    with pytest.raises(SystemExit):
        example.parse_args(["--method", "maml", "--feature-norm", "5"])
    assert example.parse_args(["--method", "hyperrep", "--feature-norm", "6"]).feature_norm == 6

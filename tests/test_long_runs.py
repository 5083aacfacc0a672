"""Trustworthy long runs: a diverging LL never moves the UL, a NaN in the UL data is named,
SIGTERM / SIGINT save and stop, checkpoints by time, and a data source that runs out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from problems import DTYPE, ridge, ridge_hessian, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent, LowerLevelDivergenceError
from bilevel.problem import Interrupted
from bilevel.ul import Implicit, Reverse

# --- a diverging LL never reaches the UL ---------------------------------------------------


def diverging(method, iters, policy):
    """GradientDescent(lr=1.0) on a ridge problem whose LL needs lr < 2/L = 0.32: the LL loss
    grows geometrically (finite for 30 steps, overflowing to inf and NaN for 400)."""
    p = ridge(scale=2.0)
    assert 2 / float(torch.linalg.eigvalsh(ridge_hessian(p))[-1]) < 0.33
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=1.0, iters=iters)
    ul = method(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    optimizer = torch.optim.Adam(p.ul_model.parameters(), lr=0.1)
    return p, BilevelProblem(ll, ul, optimizer, on_nonfinite=policy), optimizer


@pytest.mark.parametrize("method", [Reverse, Implicit])
@pytest.mark.parametrize(
    ("iters", "error"), [(30, LowerLevelDivergenceError), (400, FloatingPointError)]
)
def test_a_diverging_ll_raises_and_leaves_the_ul_bitwise_unchanged(method, iters, error):
    p, problem, optimizer = diverging(method, iters, "raise")
    before = p.ul_model.log_l2.detach().clone()
    for step in range(2):  # every such step, not only the first
        with pytest.raises(error, match=rf"UL step {step} \({method.name}\): The LL loss"):
            problem.step(p.train, p.val)
        problem.step_count += 1  # as a caller that catches it and goes on would see it
    assert torch.equal(p.ul_model.log_l2.detach(), before)
    assert p.ul_model.log_l2.grad is None and not optimizer.state  # Adam never stepped


@pytest.mark.parametrize("method", [Reverse, Implicit])
@pytest.mark.parametrize("iters", [30, 400])
def test_a_diverging_ll_is_skipped_and_leaves_the_ul_bitwise_unchanged(method, iters):
    p, problem, optimizer = diverging(method, iters, "skip")
    before = p.ul_model.log_l2.detach().clone()
    problem.run(lambda step: (p.train, p.val), steps=3, progress=False)
    assert problem.skipped_steps == 3 and problem.step_count == 3
    assert torch.equal(p.ul_model.log_l2.detach(), before)
    assert not optimizer.state


def test_the_divergence_error_carries_the_growth_and_a_stable_step():
    p, problem, _ = diverging(Reverse, 30, "raise")
    lam = float(torch.linalg.eigvalsh(ridge_hessian(p))[-1])
    with pytest.raises(LowerLevelDivergenceError) as err:
        problem.step(p.train, p.val)
    e = err.value
    assert e.iters == 30 and e.last > 1e20 * e.first > 0
    assert lam * (1 - 1e-3) < e.lambda_max <= lam * (1 + 1e-12)  # power iteration, from below
    assert e.safe_lr == pytest.approx(1 / e.lambda_max) and e.safe_lr < 2 / lam
    assert f"use lr={e.safe_lr:.3g}" in str(e) and "lr=1," in str(e)


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=DTYPE))


def quadratic_ll(state):
    return 0.5 * (state["ll_model"].w ** 2).sum()  # Hessian 1: w <- (1 - lr) w


@pytest.mark.parametrize(("growth", "diverges"), [(5e-4, False), (2e-3, True)])
def test_the_growth_tolerance_is_relative_1e_3(growth, diverges):
    """Two steps of w <- (1 - lr) w on 0.5 w^2 with |1 - lr| = sqrt(1 + growth): the loss before
    the last step is (1 + growth) times the first, up to round-off."""
    lr = 1 + (1 + growth) ** 0.5
    ll = GradientDescent(quadratic_ll, Scalar(), Scalar(), lr=lr, iters=2)
    if diverges:
        with pytest.raises(LowerLevelDivergenceError) as err:
            ll.optimize(None, None)
        assert err.value.lambda_max == pytest.approx(1.0, rel=1e-12)
    else:
        ll.optimize(None, None)
    ll = GradientDescent(quadratic_ll, Scalar(), Scalar(), lr=lr, iters=2, growth_tolerance=1e-2)
    ll.optimize(None, None)  # a looser tolerance lets both through


def test_round_off_at_the_solution_is_not_growth():
    """An LL that starts at its exact solution moves only by round-off: never refused."""
    from problems import ridge_solution

    p = ridge(scale=3.0)
    with torch.no_grad():
        p.ll_model.w.copy_(ridge_solution(p))
    lam = float(torch.linalg.eigvalsh(ridge_hessian(p))[-1])
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=1.9 / lam, iters=300)
    losses = ll.run(*p.train).losses
    assert float((losses - losses[0]).abs().max()) < 1e-12 * float(losses[0])


def test_on_growth_policies_and_the_deprecated_flag():
    p = ridge(scale=2.0)
    kwargs = {"lr": 1.0, "iters": 30}
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, on_growth="ignore", **kwargs)
    ll.optimize(*p.train)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, on_growth="warn", **kwargs)
    with pytest.warns(RuntimeWarning, match="the LL is diverging"):
        ll.optimize(*p.train)
    with pytest.warns(DeprecationWarning, match="use on_growth='ignore'"):
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, warn_on_growth=False, **kwargs)
    assert ll.on_growth == "ignore" and not ll.warn_on_growth
    ll.optimize(*p.train)
    with pytest.raises(TypeError, match="contradicts"):
        GradientDescent(
            ridge_ll, p.ll_model, p.ul_model, warn_on_growth=True, on_growth="raise", **kwargs
        )
    with pytest.raises(ValueError, match="on_growth must be"):
        GradientDescent(ridge_ll, p.ll_model, p.ul_model, on_growth="stop", **kwargs)
    with pytest.raises(ValueError, match="growth_tolerance must be"):
        GradientDescent(ridge_ll, p.ll_model, p.ul_model, growth_tolerance=-1.0, **kwargs)


@pytest.mark.parametrize("iters", [5, 40])
def test_an_ll_run_costs_one_host_sync(iters, monkeypatch):
    """The NaN and growth checks read one small tensor once per run, however many steps."""
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=iters)
    ll.run(*p.train)  # warm up (patching)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for differentiable_steps in (0, None):
        reads.clear()
        ll.run(*p.train, differentiable_steps=differentiable_steps)
        assert reads == ["tolist"]


# --- a NaN in the UL objective or data under Implicit names the UL side ---------------------


def nan_gradient(state):
    w = state["ll_model"].w
    return ridge_ul(state) + 0 * torch.sqrt(w[0] - w[0])  # finite loss, NaN gradient


def dense(matvec, b):  # a user's solver: a dense solve
    n = b[0].numel()
    columns = [matvec([e.view_as(b[0])])[0].reshape(-1) for e in torch.eye(n, dtype=b[0].dtype)]
    return [torch.linalg.solve(torch.stack(columns, 1), b[0].reshape(-1)).view_as(b[0])]


@pytest.mark.parametrize("method", ["cg", "neumann", "fixed_point", "minres", "normal_cg", dense])
@pytest.mark.parametrize("cause", ["ul_objective", "val x", "val y", "gradient"])
def test_nan_on_the_ul_side_under_implicit_is_named(method, cause):
    p = ridge()
    xv, yv = p.val[0].clone(), p.val[1].clone()
    objective = {"ul_objective": lambda s: ridge_ul(s) * float("nan"), "gradient": nan_gradient}
    if cause == "val x":
        xv[3, 1] = float("nan")
    if cause == "val y":
        yv[7] = float("nan")
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=60)
    ul = Implicit(
        objective.get(cause, ridge_ul), p.ul_model, ridge_ll, p.ll_model, k=5, method=method
    )
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
    before = p.ul_model.log_l2.detach().clone()
    with pytest.raises(FloatingPointError) as err:
        problem.step(p.train, (xv, yv))
    message = str(err.value)
    assert "UL loss" in message and "validation data" in message, message
    assert "curvature" not in message and "series diverged" not in message
    assert torch.equal(p.ul_model.log_l2.detach(), before)


# --- signals and checkpoints by time ------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from problems import ridge, ridge_ll, ridge_ul
    from bilevel import BilevelProblem
    from bilevel.ll import GradientDescent
    from bilevel.ul import Implicit

    def train(path, delay, stop_at=None, signum=None):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        p = ridge()
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=40)
        ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, k=5)
        problem = BilevelProblem(ll, ul, torch.optim.Adam(p.ul_model.parameters(), lr=0.05))

        def batch(step):  # random minibatches: the RNG state must survive the stop
            Path(path + ".step").write_text(str(step))
            if step == stop_at:
                import os
                os.kill(os.getpid(), signum)
            time.sleep(delay)
            idx = torch.randint(0, 60, (30,))
            return (p.train[0][idx], p.train[1][idx]), p.val

        # checkpoint_every is large: only the signal saves mid-run
        problem.run(batch, steps=30, checkpoint=path, checkpoint_every=1000, progress=False)
        torch.save(p.ul_model.state_dict(), path + ".final")
        return problem

    if __name__ == "__main__":
        train(sys.argv[1], float(sys.argv[2]))
    """
)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    return path


def load(path):
    return torch.load(path, weights_only=True)


def reference(script, tmp_path):
    """The uninterrupted run's final UL state (in this process: same code, one thread)."""
    import runpy

    full = str(tmp_path / "full.pt")
    runpy.run_path(str(script))["train"](full, 0.0)
    return load(full + ".final")


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes_bitwise(script, tmp_path):
    ckpt = tmp_path / "run.pt"
    command = [sys.executable, str(script), str(ckpt)]
    proc = subprocess.Popen([*command, "0.05"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # signal it mid-run
        try:
            if int(Path(str(ckpt) + ".step").read_text()) >= 5:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err  # as if terminated, after saving
    step = load(ckpt)["step"]
    assert 5 < step < 30, step
    assert f"SIGTERM: stopped after UL step {step} of 30; checkpoint saved to {ckpt}" in err
    assert not Path(str(ckpt) + ".final").exists()
    import runpy

    runpy.run_path(str(script))["train"](str(ckpt), 0.0)  # what the same command runs
    resumed = load(str(ckpt) + ".final")
    full = reference(script, tmp_path)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_sigint_saves_then_raises_keyboard_interrupt_and_resumes_bitwise(script, tmp_path):
    import runpy

    train = runpy.run_path(str(script))["train"]
    ckpt = str(tmp_path / "run.pt")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match=r"SIGINT: stopped after UL step 8 of 30"):
        train(ckpt, 0.0, stop_at=7, signum=signal.SIGINT)  # arrives while step 7 is fetched
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert load(ckpt)["step"] == 8
    with pytest.raises(Interrupted) as stop:
        train(ckpt, 0.0, stop_at=12, signum=signal.SIGTERM)
    assert (stop.value.code, stop.value.step, stop.value.checkpoint) == (143, 13, ckpt)
    assert load(ckpt)["step"] == 13
    train(ckpt, 0.0)
    resumed = load(ckpt + ".final")
    full = reference(script, tmp_path)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize(
    ("signum", "stopped"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)]
)
def test_a_second_signal_stops_at_once(tmp_path, signum, stopped):
    """A second SIGTERM was ignored until the UL step ended."""
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=5)
    problem = BilevelProblem(
        ll,
        Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model),
        torch.optim.SGD(p.ul_model.parameters(), lr=0.1),
    )

    def batch(step):
        if step == 2:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)  # the second raises here, mid-step
        return p.train, p.val

    with pytest.raises(stopped) as err:
        problem.run(batch, steps=10, checkpoint=tmp_path / "c.pt", progress=False)
    assert "stopped after" not in str(err.value) and problem.step_count == 2
    assert not isinstance(err.value, Interrupted)  # (not the clean stop after the step)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now


def test_checkpoints_by_time(tmp_path, monkeypatch):
    import bilevel.problem

    clock = FakeClock()
    monkeypatch.setattr(bilevel.problem, "time", clock)
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=5)
    ul = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
    saved = []
    monkeypatch.setattr(problem, "save_checkpoint", lambda path: saved.append(problem.step_count))

    def batch(step):
        clock.now = 10.0 * (step + 1)  # each step takes 10 s
        return p.train, p.val

    problem.run(batch, steps=10, checkpoint=tmp_path / "c.pt", checkpoint_every=1000,
                checkpoint_seconds=25, progress=False)  # fmt: skip
    assert saved == [3, 6, 9, 10]  # 30 s after the start, then every 30 s, and at the end
    with pytest.raises(ValueError, match="checkpoint_seconds must be None or a number > 0"):
        problem.run(batch, steps=10, checkpoint_seconds=0)


def test_data_that_runs_out_is_refused_with_counts_after_saving(tmp_path):
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=5)
    ul = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
    ckpt = tmp_path / "c.pt"
    with pytest.raises(ValueError, match=r"data holds 3 batches but steps=5"):
        problem.run([(p.train, p.val)] * 3, steps=5, checkpoint=ckpt, progress=False)
    assert problem.step_count == 0 and not ckpt.exists()  # refused before the first step
    batches = ((p.train, p.val) for _ in range(3))  # no length: found out at the end
    with pytest.raises(ValueError, match=r"data ran out after 3 batches.*steps=5"):
        problem.run(batches, steps=5, checkpoint=ckpt, checkpoint_every=1000, progress=False)
    assert load(ckpt)["step"] == 3  # the work done is kept

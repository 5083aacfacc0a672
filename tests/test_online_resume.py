"""Online runs (RTHO and online truncated reverse) resume bitwise from their checkpoints.

An online run of 22 LL steps with a UL update every 4 is stopped before LL step k (an error
raised by the batch function, as a kill would stop it, or SIGTERM), then run again in a
"new process" (other seeds, new models, optimizer and runner) from its checkpoint: the LL
fast weights, the batch-norm buffers, the UL parameters, the UL optimizer's state, the log
records after the resumed update and the RNG states at the end must be those of the
uninterrupted run, bitwise. The run draws its LL and UL minibatches from torch, NumPy and
Python's ``random``; its LL is SGD with momentum (or Adam) with a step size computed from the
UL model.
Files that are not checkpoints of this online run are refused with the cure.
"""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
from problems import DTYPE, FeatureL2, ridge, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem, checkpoint
from bilevel.checkpoint import CheckpointError
from bilevel.ll import GradientDescent, fast_weights
from bilevel.online import OnlineHypergradient
from bilevel.problem import Interrupted
from bilevel.ul import Forward, Implicit, Truncated

EVERY = 4  # LL steps between UL updates
STEPS = 22  # not a multiple of EVERY: the run ends with 2 LL steps after its last update
METHODS = ["forward", "truncated"]


class Net(nn.Module):
    """``batchnorm(x) @ w``: an LL model with buffers that every LL step changes."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=DTYPE))
        self.bn = nn.BatchNorm1d(d, affine=False, dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) @ self.w


class Hypers(FeatureL2):
    """Per-feature penalties and the LL step size."""

    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.log_lr = nn.Parameter(torch.tensor(-1.0, dtype=DTYPE))


class Run:
    """One online run as a script builds it: data, models, LL, method, UL optimizer."""

    def __init__(self, method: str, every: int = EVERY, rule: str = "momentum") -> None:
        self.p = ridge(d=5)
        self.net, self.ul = Net(5), Hypers(5)
        lr = lambda u: u.log_lr.exp()  # noqa: E731
        if rule == "momentum":
            ll = GradientDescent(ridge_ll, self.net, self.ul, lr=lr, iters=1, momentum=0.5)
        else:  # its moments and its bias correction (by the LL step count) continue
            ll = GradientDescent(ridge_ll, self.net, self.ul, lr=lr, iters=1, optimizer="adam")
        if method == "forward":
            calculator = Forward(ridge_ul, self.ul, ridge_ll, self.net)
        else:
            calculator = Truncated(ridge_ul, self.ul, ridge_ll, self.net, truncate_iter=every)
        self.optimizer = torch.optim.Adam(self.ul.parameters(), lr=0.05)
        self.runner = OnlineHypergradient(ll, calculator, self.optimizer, every)
        self.records: list[dict] = []
        self.asked: list[int] = []

    def train(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A random LL minibatch: an exact resume needs the three generators restored."""
        self.asked.append(step)
        idx = torch.cat(
            [
                torch.randint(0, 60, (10,)),
                torch.from_numpy(np.random.randint(0, 60, 5)),
                torch.tensor([random.randrange(60) for _ in range(5)]),
            ]
        )
        return self.p.train[0][idx], self.p.train[1][idx]

    def val(self, update: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, 60, (20,))
        return self.p.val[0][idx], self.p.val[1][idx]

    def terminated_at(self, step: int):
        """A ``train`` that sends this process SIGTERM when asked for LL step ``step``."""

        def train(asked: int) -> tuple[torch.Tensor, torch.Tensor]:
            if asked == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return self.train(asked)

        return train

    def run(self, steps: int = STEPS, train=None, **kwargs) -> nn.Module:
        train = self.train if train is None else train
        return self.runner.run(
            train, self.val, steps, log=self.records.append, progress=False, **kwargs
        )


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def outcome(run: Run, model: nn.Module) -> dict:
    """What must be equal bitwise: LL weights and buffers, UL parameters, UL optimizer state,
    and the RNG states after the run (the random draws continue alike)."""
    state = run.optimizer.state_dict()["state"]
    rng = checkpoint.rng_state()
    return {
        "ll": [w.detach().clone() for w in fast_weights(model)],
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "ul": [p.detach().clone() for p in run.ul.parameters()],
        "optimizer": [t for s in state.values() for t in s.values()],
        "rng": [rng["torch"], rng["python"]["state"], rng["numpy"]["key"]],
        "numpy_pos": rng["numpy"]["pos"],
    }


def assert_bitwise(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in ("ll", "ul", "optimizer", "rng"):
        assert len(got[key]) == len(want[key]) > 0, key
        for a, b in zip(got[key], want[key], strict=True):
            assert torch.equal(a, b), key
    assert got["buffers"].keys() == want["buffers"].keys() and got["buffers"]
    for name, buffer in want["buffers"].items():
        assert torch.equal(got["buffers"][name], buffer), name
    assert got["numpy_pos"] == want["numpy_pos"]


def uninterrupted(method: str, rule: str = "momentum") -> tuple[dict, list[dict]]:
    seed_all(0)
    run = Run(method, rule=rule)
    return outcome(run, run.run()), run.records


class Killed(Exception):
    """Stands for a kill before an LL step."""


@pytest.mark.parametrize("rule", ["momentum", "adam"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("k", "checkpoint_every"), [(10, 1), (12, 1), (12, 2), (19, 3)])
def test_an_interrupted_online_run_resumes_bitwise(tmp_path, method, k, checkpoint_every, rule):
    """Stopped before LL step k, between UL updates (k = 10, 19) or right after one (12); the
    last checkpoint is at the latest UL update or, saving every 2 or 3 updates, before it
    (LL step 8 for k = 12, 12 for k = 19). The resumed run takes the LL steps since then
    again, and the UL updates among them."""
    want, records = uninterrupted(method, rule)
    path = tmp_path / "online.pt"

    seed_all(0)
    run = Run(method, rule=rule)

    def killed(step: int):
        if step == k:
            raise Killed
        return run.train(step)

    with pytest.raises(Killed):
        run.run(train=killed, checkpoint=path, checkpoint_every=checkpoint_every)
    saved = torch.load(path, weights_only=True)
    last_update = (k // EVERY) // checkpoint_every * checkpoint_every
    assert (saved["step"], saved["online"]["ll_step"]) == (last_update, last_update * EVERY)

    seed_all(1)  # a new process: other seeds, new models and runner
    resumed = Run(method, rule=rule)
    got = outcome(resumed, resumed.run(checkpoint=path))
    assert_bitwise(got, want)
    assert resumed.asked == list(range(last_update * EVERY, STEPS))  # each batch asked once
    assert resumed.records == records[last_update:]  # UL and LL losses of every update


@pytest.mark.parametrize("method", METHODS)
def test_sigterm_saves_at_the_next_update_and_the_run_resumes_bitwise(tmp_path, method):
    want, _ = uninterrupted(method)
    path = tmp_path / "online.pt"
    seed_all(0)
    run = Run(method)
    with pytest.raises(Interrupted) as stopped:
        run.run(train=run.terminated_at(9), checkpoint=path, checkpoint_every=100)
    assert stopped.value.step == 3 and run.asked[-1] == 11  # the update at LL step 12
    assert torch.load(path, weights_only=True)["online"]["ll_step"] == 12
    seed_all(1)
    resumed = Run(method)
    assert_bitwise(outcome(resumed, resumed.run(checkpoint=path)), want)


@pytest.mark.parametrize("method", METHODS)
def test_a_finished_run_resumed_with_more_steps_is_the_longer_run(tmp_path, method):
    """A run of 14 LL steps is saved at its last update (LL step 12); run again with 22, it
    continues from there as one run of 22; run again with 22, it takes no step."""
    want, _ = uninterrupted(method)
    path = tmp_path / "online.pt"
    seed_all(0)
    Run(method).run(steps=14, checkpoint=path)
    seed_all(1)
    longer = Run(method)
    assert_bitwise(outcome(longer, longer.run(checkpoint=path)), want)
    assert longer.asked == list(range(12, STEPS))
    seed_all(2)
    again = Run(method)
    model = again.run(checkpoint=path)
    assert again.asked == [20, 21] and not again.records  # the LL steps after the last update
    assert_bitwise(outcome(again, model), want)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_after_a_run_resumes_it_in_memory(method):
    """``load_state_dict`` then ``run`` continues the run (no file); the state holds only
    tensors and plain values, and the tangents Z_t (RTHO) or no observer state (Truncated)."""
    want, _ = uninterrupted(method)
    seed_all(0)
    first = Run(method)
    first.run(steps=14)
    state = first.runner.state_dict()
    assert (state["step"], state["online"]["ll_step"], state["online"]["run"]["steps"]) == (
        3,
        12,
        12,
    )
    observer = state["online"]["run"]["observer"]
    if method == "forward":  # one tangent per LL weight, one row per UL scalar (5 + 1)
        assert [list(z.shape) for z in observer["tangents"]] == [[6, 5]]
        assert list(observer["state_tangents"]) == ["momentum_buffer"]
    else:
        assert observer is None
    assert list(state["online"]["run"]["opt_state"]) == ["momentum_buffer"]
    seed_all(1)
    second = Run(method)
    second.runner.load_state_dict(state)
    assert_bitwise(outcome(second, second.run()), want)


@pytest.mark.parametrize("method", METHODS)
def test_the_checkpoint_loads_with_the_weights_only_loader(tmp_path, method):
    path = tmp_path / "online.pt"
    seed_all(0)
    Run(method).run(steps=8, checkpoint=path)
    state = torch.load(path, weights_only=True)  # no code runs: tensors and plain values only
    assert state["format"] == "bilevel-checkpoint" and state["settings"]["online"] == {
        "hyper_every": EVERY
    }


class RunsCode:
    """Unpickling this creates ``marker``: what a crafted file would do with ``os.system``."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path):
    seed_all(0)
    run = Run("forward")
    run.run(steps=8)
    state = {"format": "bilevel-checkpoint", "version": 2, **run.runner.state_dict()}
    marker = tmp_path / "marker"
    state["online"]["run"]["observer"] = RunsCode(marker)  # code hidden in the tangents
    path = tmp_path / "online.pt"
    torch.save(state, path)
    before = [p.detach().clone() for p in run.ul.parameters()]
    for load in (run.runner.load_checkpoint, lambda f: run.run(checkpoint=f)):
        with pytest.raises(CheckpointError, match="cannot be loaded safely") as error:
            load(path)
        assert "restart the run" in str(error.value) and "online.pt" in str(error.value)
        assert not marker.exists(), "loading the crafted file ran its code"
    assert all(torch.equal(a, b) for a, b in zip(before, run.ul.parameters(), strict=True))
    torch.load(path, weights_only=False)  # the file does run code when unpickled unsafely
    assert marker.exists()


def test_a_damaged_checkpoint_is_refused_and_kept(tmp_path):
    seed_all(0)
    path = tmp_path / "online.pt"
    Run("forward").run(steps=8, checkpoint=path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped (in a tensor's bytes or the structure)
    path.write_bytes(bytes(data))
    run = Run("forward")
    with pytest.raises(CheckpointError, match="Restore it from a copy, or delete it"):
        run.run(checkpoint=path)
    assert path.read_bytes() == bytes(data) and not run.asked


def test_a_checkpoint_of_a_bilevel_problem_is_refused(tmp_path):
    """Refused as a file (no online run in it) and as a state, unless loaded on purpose with
    ``strict=False`` (its UL state, and a new LL run), as the message says."""
    other = Run("forward")
    ll = GradientDescent(ridge_ll, other.net, other.ul, lr=0.5, iters=5)
    ul = Implicit(ridge_ul, other.ul, ridge_ll, other.net, 0.5, k=3)
    problem = BilevelProblem(ll, ul, torch.optim.Adam(other.ul.parameters(), lr=0.05))
    with torch.no_grad():
        other.ul.log_lr.fill_(-2.0)
    path = tmp_path / "problem.pt"
    problem.save_checkpoint(path)
    run = Run("forward")
    with pytest.raises(CheckpointError, match=r"without 'online'.*Point to the right file"):
        run.run(checkpoint=path)
    with pytest.raises(ValueError, match=r"holds no online run.*strict=False"):
        run.runner.load_state_dict(problem.state_dict())
    assert run.ul.log_lr.item() == -1.0 and not run.asked
    run.runner.load_state_dict(problem.state_dict(), strict=False)
    assert run.ul.log_lr.item() == -2.0
    run.run(steps=8)
    assert run.asked == list(range(8))  # a new LL run


@pytest.mark.parametrize(
    ("method", "every", "differs"),
    [
        ("forward", 2, r"online\.hyper_every: 4 -> 2"),
        ("truncated", EVERY, r"ul: 'forward' -> 'truncated'"),
    ],
)
def test_a_checkpoint_of_another_online_run_is_refused(tmp_path, method, every, differs):
    path = tmp_path / "online.pt"
    seed_all(0)
    Run("forward").run(steps=8, checkpoint=path)
    seed_all(1)
    other = Run(method, every)
    before = [p.detach().clone() for p in other.ul.parameters()]
    with pytest.raises(ValueError, match=differs) as error:
        other.run(checkpoint=path)
    assert "start a new run with another checkpoint path (or delete it)" in str(error.value)
    assert not other.asked
    assert all(torch.equal(a, b) for a, b in zip(before, other.ul.parameters(), strict=True))


def test_a_state_not_saved_at_an_update_is_refused_before_any_change():
    seed_all(0)
    run = Run("forward")
    run.run(steps=8)
    state = run.runner.state_dict()
    state["online"]["ll_step"] = 7
    before = [p.detach().clone() for p in run.ul.parameters()]
    with pytest.raises(ValueError, match="damaged or was not written by OnlineHypergradient"):
        run.runner.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, run.ul.parameters(), strict=True))

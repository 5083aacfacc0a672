"""Review of the session's online resume (float64, against the uninterrupted run bitwise).

``OnlineHypergradient.state_dict()`` promises copies ("a state kept in memory stays that of
its UL update"), but after a run it returned the runner's own record of its last update:
changing the returned state (a field, a tensor in place) changed what the runner held, so
its next ``state_dict()`` and ``save_checkpoint()`` wrote the changed state. Likewise
``load_state_dict`` kept the caller's dict, so changing it after the load changed the run
that ``run()`` then continued (``nn.Module.load_state_dict`` copies). A guard: the runner
still refuses a missing UL optimizer now that ``BilevelProblem`` checks its arguments.
"""

from __future__ import annotations

import pytest
import torch
from test_online_resume import Run, assert_bitwise, outcome, seed_all, uninterrupted

from bilevel.online import OnlineHypergradient


def test_a_state_returned_after_a_run_is_a_copy(tmp_path):
    """FOUND: the LL step set on the returned state (7) and a weight changed in place came
    back from the next state_dict() and went into the checkpoint."""
    seed_all(0)
    run = Run("forward")
    run.run(steps=8)
    state = run.runner.state_dict()
    weight = state["online"]["run"]["weights"][0].clone()
    state["online"]["ll_step"] = 7
    state["online"]["run"]["weights"][0].add_(1.0)
    again = run.runner.state_dict()
    assert again["online"]["ll_step"] == 8
    assert torch.equal(again["online"]["run"]["weights"][0], weight)
    run.runner.save_checkpoint(tmp_path / "online.pt")
    saved = torch.load(tmp_path / "online.pt", weights_only=True)
    assert saved["online"]["ll_step"] == 8
    assert torch.equal(saved["online"]["run"]["weights"][0], weight)


def test_a_loaded_state_changed_afterwards_does_not_change_the_run():
    """FOUND: the run continued from the weights as changed after the load."""
    want, _ = uninterrupted("truncated")
    seed_all(0)
    first = Run("truncated")
    first.run(steps=14)
    state = first.runner.state_dict()
    seed_all(1)
    second = Run("truncated")
    second.runner.load_state_dict(state)
    state["online"]["run"]["weights"][0].add_(1.0)  # the caller reuses its dict
    assert_bitwise(outcome(second, second.run()), want)


def test_the_online_runner_refuses_a_missing_ul_optimizer():
    """Guard: BilevelProblem, which now checks the models and optimizer for the runner,
    accepts ``ul_optimizer=None``; an online run cannot (it steps the optimizer)."""
    run = Run("forward")
    ll, ul = run.runner.ll, run.runner.ul
    for optimizer in (None, "sgd"):
        with pytest.raises(TypeError, match=r"ul_optimizer must be a torch\.optim\.Optimizer"):
            OnlineHypergradient(ll, ul, optimizer, 4)

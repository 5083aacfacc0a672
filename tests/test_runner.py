"""BilevelProblem: hypergradient, step, run, logging and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from problems import ridge, ridge_exact_hypergradient, ridge_ll, ridge_ul

from bilevel import BilevelProblem, checkpoint
from bilevel.ll import GradientDescent
from bilevel.ul import Implicit, Reverse, Truncated


def make(p, ul_cls=Implicit, lr=0.05, **kwargs):
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=60)
    if ul_cls is Implicit:
        ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.5, k=10)
    else:
        ul = ul_cls(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **kwargs)
    opt = torch.optim.Adam(p.ul_model.parameters(), lr=lr)
    return BilevelProblem(ll, ul, opt)


def test_each_method_runs_the_ll_recording_what_it_needs_and_the_ll_is_left_as_given():
    p = ridge()
    for problem, needed in (
        (make(p), 0),
        (make(p, Reverse), 60),
        (make(p, Truncated, truncate_iter=5), 5),
    ):
        assert problem.ul.run_ll(problem.ll, *p.train).differentiable_steps == needed
        assert problem.ll.differentiable_steps is None  # nothing was written into the LL


def test_hypergradient_leaves_parameters_and_grads_unchanged():
    p = ridge()
    problem = make(p)
    before = p.ul_model.log_l2.detach().clone()
    p.ul_model.log_l2.grad = torch.full_like(before, 7.0)
    (grad,) = problem.hypergradient(p.train, p.val)
    assert torch.equal(p.ul_model.log_l2.detach(), before)
    assert torch.equal(p.ul_model.log_l2.grad, torch.full_like(before, 7.0))
    torch.testing.assert_close(grad, ridge_exact_hypergradient(p), rtol=1e-9, atol=0)


def test_seed_flow_accumulates_into_grad():
    p = ridge()
    problem = make(p)
    aux = problem.ll.optimize(*p.train)
    # the seed flow's LL keeps a graph, which Implicit says (once) that it does not use
    with pytest.warns(UserWarning, match="does not use the LL graph"):
        problem.ul.compute_gradients(*p.val, aux, *p.train)
    problem.ul.compute_gradients(*p.val, aux, *p.train)
    torch.testing.assert_close(
        p.ul_model.log_l2.grad, 2 * ridge_exact_hypergradient(p), rtol=1e-9, atol=0
    )


def test_step_applies_the_ul_optimizer_to_the_hypergradient():
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=60)
    ul = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.5, k=10)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1))
    before = p.ul_model.log_l2.detach().clone()
    exact = ridge_exact_hypergradient(p)
    loss = problem.step(p.train, p.val)
    torch.testing.assert_close(p.ul_model.log_l2.detach(), before - 0.1 * exact, rtol=1e-9, atol=0)
    assert loss.ndim == 0 and problem.step_count == 1


def test_ul_loss_falls_over_a_run_and_logs_diagnostics():
    p = ridge()
    problem = make(p, lr=0.1)
    records = []
    last = problem.run(
        lambda step: (p.train, p.val), steps=30, log=records.append, log_every=10, progress=False
    )
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[-1]["ul_loss"] < records[0]["ul_loss"]
    assert {"iterations", "residual_norm", "converged", "ll_loss", "ll_grad_norm"} <= set(last)
    assert last["converged"] is True


def test_run_resumes_from_a_checkpoint_exactly(tmp_path):
    def batch(step):  # random batches: the RNG state must be restored for an exact resume
        idx = torch.randint(0, 60, (40,))
        return (p.train[0][idx], p.train[1][idx]), p.val

    p = ridge()
    torch.manual_seed(0)
    make(p).run(batch, steps=12, progress=False)
    uninterrupted = p.ul_model.log_l2.detach().clone()

    p = ridge()
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    make(p).run(batch, steps=5, checkpoint=path, checkpoint_every=5, progress=False)
    torch.manual_seed(123)  # a new process would start from another state
    p = ridge()
    problem = make(p)
    problem.run(batch, steps=12, checkpoint=path, checkpoint_every=5, progress=False)
    assert problem.step_count == 12
    assert torch.equal(p.ul_model.log_l2.detach(), uninterrupted)
    saved = checkpoint.load(path)
    assert saved["step"] == 12 and "ul_model" in saved and "ul_optimizer" in saved
    assert (saved["format"], saved["version"]) == ("bilevel-checkpoint", 2)


class ShuffledBatches:
    """``epochs`` passes of a ``DataLoader(shuffle=True)`` over the train split (6 batches
    each), each batch with the whole validation split: each pass draws its order from the
    global generator when it begins."""

    def __init__(self, p, epochs: int = 1) -> None:
        self.p, self.epochs = p, epochs
        dataset = torch.utils.data.TensorDataset(*p.train)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=10, shuffle=True)
        self.seen: list[torch.Tensor] = []

    def __iter__(self):
        for _ in range(self.epochs):
            for x, y in self.loader:
                self.seen.append(y)
                yield (x, y), self.p.val


def dropout_problem(p) -> BilevelProblem:
    """Implicit on ridge whose LL objective drops features at random (global generator)."""

    def ll_objective(state):
        data = torch.nn.functional.dropout(state["data"], 0.2)
        return ridge_ll({**state, "data": data})

    ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=0.5, iters=10)
    # (a noisy LL is not stationary: its warning is not what this is about)
    ul = Implicit(ridge_ul, p.ul_model, ll_objective, p.ll_model, k=5, stationarity_warning=None)
    optimizer = torch.optim.Adam(p.ul_model.parameters(), lr=0.05)
    return BilevelProblem(ll, ul, optimizer)


@pytest.mark.parametrize("stop", [3, 8])
def test_run_resumes_a_shuffling_data_loader_epoch_after_epoch(tmp_path, stop):
    """Resumed after the second epoch began (8), where the steps' random draws came between
    the first epoch's order and the second's: the data's draws come from a stream of their
    own, so the resume replays them without the steps' (a replay from one saved state gave
    the second epoch another order: 1.2e-2 relative off)."""
    p = ridge()
    torch.manual_seed(0)
    data = ShuffledBatches(p, epochs=2)
    dropout_problem(p).run(data, steps=10, progress=False)
    uninterrupted, batches = p.ul_model.log_l2.detach().clone(), data.seen

    p = ridge()
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    dropout_problem(p).run(ShuffledBatches(p, 2), steps=stop, checkpoint=path, progress=False)
    torch.manual_seed(123)  # a new process would start from another state
    p = ridge()
    data = ShuffledBatches(p, epochs=2)
    dropout_problem(p).run(data, steps=10, checkpoint=path, progress=False)
    for a, b in zip(data.seen[stop:], batches[stop:], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(p.ul_model.log_l2.detach(), uninterrupted)


def test_run_goes_on_with_a_one_shot_iterator_passed_again():
    """A generator passed to run again (as after a stop in a notebook) goes on from the
    batches taken (before: it skipped as many again), and one that cannot go back to the
    step the problem is at is refused."""
    p = ridge()
    torch.manual_seed(0)
    whole = ShuffledBatches(p, epochs=2)
    make(p).run(whole, steps=10, progress=False)
    expected = p.ul_model.log_l2.detach().clone()

    p = ridge()
    torch.manual_seed(0)
    problem = make(p)
    data = ShuffledBatches(p, epochs=2)
    batches = iter(data)
    problem.run(batches, steps=5, progress=False)
    problem.run(batches, steps=10, progress=False)
    assert torch.equal(p.ul_model.log_l2.detach(), expected)
    assert all(torch.equal(a, b) for a, b in zip(data.seen, whole.seen, strict=True))
    problem.step_count = 7  # (as a checkpoint of an earlier step would set it)
    with pytest.raises(ValueError, match="already took 10 batches"):
        problem.run(batches, steps=12, progress=False)


def test_run_resumes_a_shuffling_data_loader_with_its_batches(tmp_path):
    """BUG (before the fix): a resumed run iterated its data from the checkpoint's generator
    state, so a shuffling DataLoader drew another permutation: other batches after the
    resume, every later draw shifted, and another final model."""
    p = ridge()
    torch.manual_seed(0)
    data = ShuffledBatches(p)
    make(p).run(data, steps=6, progress=False)
    uninterrupted, batches = p.ul_model.log_l2.detach().clone(), data.seen

    p = ridge()
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    make(p).run(ShuffledBatches(p), steps=3, checkpoint=path, progress=False)
    torch.manual_seed(123)  # a new process would start from another state
    p = ridge()
    data = ShuffledBatches(p)
    make(p).run(data, steps=6, checkpoint=path, progress=False)
    assert len(data.seen) == 6  # the three skipped, the three taken
    for a, b in zip(data.seen[3:], batches[3:], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(p.ul_model.log_l2.detach(), uninterrupted)


def test_run_accepts_an_iterable_and_task_batches():
    p = ridge()
    problem = make(p, Reverse)
    x, y = p.train
    xv, yv = p.val
    batches = [{"train": (x[None], y[None]), "test": (xv[None], yv[None])}] * 3
    problem.run(batches, steps=3, progress=False)
    assert problem.step_count == 3


def test_released_auxiliary_model_is_reused_and_fails_loudly_if_used():
    p = ridge()
    problem = make(p, Reverse)
    first = problem.hypergradient(p.train, p.val)
    spare = problem.ll._spare
    assert spare is not None  # the runner handed the model back
    with pytest.raises(ValueError, match=r"was released .* holds no weights"):
        spare(p.train[0])
    second = problem.hypergradient(p.train, p.val)
    assert problem.ll._spare is spare  # reused, not patched again
    torch.testing.assert_close(second, first, rtol=0, atol=0)


class NormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 1).double()
        self.norm = torch.nn.BatchNorm1d(5).double()

    def forward(self, x):
        return self.lin(self.norm(x)).squeeze(-1)


def test_reused_model_starts_from_the_original_buffers():
    p = ridge()
    net = NormNet()
    with torch.no_grad():
        net.norm.running_mean.fill_(3.0)

    def loss(state):
        return ((state["ll_model"](state["data"]) - state["target"]) ** 2).mean()

    ll = GradientDescent(loss, net, net, lr=0.1, iters=3)
    BilevelProblem(ll, Reverse(loss, net, loss, net)).hypergradient(p.train, p.val)
    aux = ll.optimize(*p.train)  # reuses the released model
    assert aux is not None and ll._spare is None
    # three training-mode steps from the original running mean, not from the previous run's
    expected = 3.0 * 0.9**3 + (1 - 0.9**3) * p.train[0].mean(0)
    torch.testing.assert_close(aux.norm.running_mean, expected, rtol=1e-12, atol=1e-12)
    assert torch.all(net.norm.running_mean == 3.0)  # the original is untouched


def test_resuming_with_other_settings_is_refused(tmp_path):
    p = ridge()
    path = tmp_path / "ckpt.pt"
    make(p, lr=0.1).run(lambda step: (p.train, p.val), steps=2, checkpoint=path, progress=False)
    other = make(ridge(), lr=0.5)
    with pytest.raises(ValueError, match=r"ul_optimizer: .*'lr': 0\.1.* -> .*'lr': 0\.5"):
        other.run(lambda step: (p.train, p.val), steps=4, checkpoint=path, progress=False)
    same = make(ridge(), lr=0.1)
    same.run(lambda step: (p.train, p.val), steps=4, checkpoint=path, progress=False)
    assert same.step_count == 4


# --- before_ul_step: transforming the hypergradient before the UL step ----------------------


def halve(params):
    for p in params:
        p.grad.mul_(0.5)


def sgd_problem(p, ul, ll, **kwargs):
    return BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.1), **kwargs)


def test_before_ul_step_transforms_the_hypergradient_that_the_step_takes():
    """Reverse on ridge: the step is ``-lr * transform(g)`` with ``g`` the hypergradient
    at the same point (halving is exact in binary floating point)."""
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=30)
    ul = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    problem = sgd_problem(p, ul, ll, before_ul_step=halve)
    (grad,) = problem.hypergradient(p.train, p.val)  # the query: not transformed
    before = p.ul_model.log_l2.detach().clone()
    problem.step(p.train, p.val)
    torch.testing.assert_close(p.ul_model.log_l2.detach(), before - 0.1 * (0.5 * grad))


def test_before_ul_step_clips_a_stateful_method_whose_ll_moves():
    """SOBA keeps its LL variable across UL steps: with the transform, the LL state advances
    exactly as without it, and the UL steps are half the untransformed ones. Two UL steps:
    SOBA's first UL direction is zero here (its ``v`` starts at zero and the UL loss does
    not read ``lambda``), so the second step is the one that moves ``lambda``, and its ``y``
    update reads the same ``lambda`` in both runs. A loop of ``hypergradient`` and a manual
    step would have left ``y`` where it was."""
    from bilevel.ul import SOBA

    runs = []
    for transform in (None, halve):
        p = ridge(seed=3)
        ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.3, iters=1)
        ul = SOBA(ridge_ul, p.ul_model, ridge_ll, p.ll_model, batch_size=None)
        problem = sgd_problem(p, ul, ll, before_ul_step=transform)
        w0, lam0 = p.ll_model.w.detach().clone(), p.ul_model.log_l2.detach().clone()
        for _ in range(2):
            problem.step(p.train, p.val)
        runs.append((p.ll_model.w.detach() - w0, p.ul_model.log_l2.detach() - lam0))
    (dw_plain, dlam_plain), (dw_halved, dlam_halved) = runs
    assert dw_plain.abs().max() > 0  # the LL moved
    assert dlam_plain.abs().min() > 1e-6  # and so did the UL variables
    torch.testing.assert_close(dw_halved, dw_plain, rtol=0, atol=0)
    # (round-off of lambda ~ -1.2 in the differences: a few 1e-16)
    torch.testing.assert_close(dlam_halved, 0.5 * dlam_plain, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_before_ul_step_that_leaves_nan_is_refused(on_nonfinite):
    p = ridge()
    problem = make(p)
    problem = BilevelProblem(
        problem.ll,
        problem.ul,
        problem.ul_optimizer,
        on_nonfinite=on_nonfinite,
        before_ul_step=lambda ps: ps[0].grad.fill_(float("nan")),
    )
    before = p.ul_model.log_l2.detach().clone()
    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="before_ul_step left is not finite"):
            problem.step(p.train, p.val)
    else:
        assert problem.last_skipped is None
        assert problem.step(p.train, p.val).isnan() and problem.skipped_steps == 1
        # why it was skipped, located as the raised error would be
        assert isinstance(problem.last_skipped, FloatingPointError)
        assert str(problem.last_skipped).startswith("UL step 0 (implicit): the gradient that")
    assert torch.equal(p.ul_model.log_l2.detach(), before)


def test_before_ul_step_must_be_callable():
    p = ridge()
    problem = make(p)
    with pytest.raises(TypeError, match="before_ul_step must be a callable"):
        BilevelProblem(problem.ll, problem.ul, problem.ul_optimizer, before_ul_step=1.0)


def test_a_skipped_step_returns_a_nan_like_a_steps_loss():
    """BUG (before the fix): a skipped step returned a float32 NaN on the CPU, where a step
    returns the UL loss in the models' dtype and on their device (float64 here), so a list of
    losses over a run mixed dtypes (and devices, on a GPU)."""
    p = ridge()
    problem = make(p, Reverse)
    problem.on_nonfinite = "skip"
    loss = problem.step(p.train, p.val)
    skipped = problem.step(p.train, (p.val[0], torch.full_like(p.val[1], float("nan"))))
    assert problem.skipped_steps == 1 and skipped.isnan()
    assert (skipped.dtype, skipped.device, skipped.shape) == (loss.dtype, loss.device, loss.shape)
    # nor is the skipped step's LL loss the step before's (it was, beside this step's
    # diagnostics; None on a skipped first step)
    assert problem.last_ll_loss.isnan()
    assert math.isnan(problem.log_record(skipped)["ll_loss"])


def test_a_skipped_first_step_records_a_nan_ll_loss():
    p = ridge()
    problem = make(p, Reverse)
    problem.on_nonfinite = "skip"
    skipped = problem.step(p.train, (p.val[0], torch.full_like(p.val[1], float("nan"))))
    assert skipped.isnan() and problem.last_ll_loss is not None and problem.last_ll_loss.isnan()

"""How every UL method treats the data it is given, in float64.

One ridge problem with a per-feature L2 penalty (``tests/problems.py``), train and
validation sets of different sizes (24 and 17 rows), is run by every method of
``bilevel.ul`` with its data

- as plain tensors (the reference), a dict of tensors, a tuple ``(x, mask)`` with masked
  padding rows, dicts whose keys differ between train and validation (an objective that gets
  the other level's data raises), integer class targets (cross-entropy against the same
  logistic problem with float targets), no target;
- given with the validation data as the train data (the same tensor objects), as
  non-contiguous views, or mutated in place between two UL steps;
- as task batches (``meta_step`` must be the mean of the tasks' ``hypergradient``, in any
  task order; methods with one LL state refuse several tasks);
- with another floating dtype than the models (refused with the cure, never cast).

Minibatch methods (SOBA, SABA, StocBiO, AmIGO, StochasticImplicit) must draw the same rows
of every member of a nested structure: objectives check each batch against the full data,
and one step is written out by hand from the sampler's indices.

Every answer is a hand-written float64 computation or the plain-tensor run of the same
problem; comparisons allow round-off only.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from problems import (
    DTYPE,
    FeatureL2,
    Linear,
    relative_error,
    ridge,
    ridge_exact_hypergradient,
)

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import (
    BOME,
    BVFIM,
    DM,
    F2SA,
    GAFFO,
    IGA,
    MESO,
    PBGD,
    PTT,
    SABA,
    SOBA,
    Alternating,
    AmIGO,
    FiniteDifference,
    FirstOrder,
    Forward,
    Implicit,
    MemorySavingReverse,
    Reptile,
    Reverse,
    Sampler,
    StocBiO,
    StochasticImplicit,
    Truncated,
)

D, N_TRAIN, N_VAL = 3, 24, 17
START = (0.1, -0.2, 0.3)  # the LL weights at the start (not 0: every term is exercised)
UL_LR = 0.1
TOL = {"rtol": 1e-12, "atol": 1e-14}  # round-off only (the values are of order 0.01 to 1)


def make_data(seed: int = 0, n: int = N_TRAIN, nv: int = N_VAL):
    """Ridge data: ``(x, y)`` train and validation pairs of ``n`` and ``nv`` rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=DTYPE)
    w = torch.randn(D, generator=g, dtype=DTYPE)
    y = x @ w + 0.3 * torch.randn(n, generator=g, dtype=DTYPE)
    xv = torch.randn(nv, D, generator=g, dtype=DTYPE)
    yv = xv @ w + 0.3 * torch.randn(nv, generator=g, dtype=DTYPE)
    return (x, y), (xv, yv)


TRAIN, VAL = make_data(0)
TRAIN2, VAL2 = make_data(1)


# --- encodings of the same data: fit(state) is half the mean squared residual -------------


def fit_plain(s):
    r = s["ll_model"](s["data"]) - s["target"]
    return 0.5 * (r**2).mean()


def fit_dict(s):
    d = s["data"]
    r = s["ll_model"](d["x"]) - d["y"]
    return 0.5 * (r**2).mean()


def fit_mask(s):
    (x, m), y = s["data"], s["target"]
    r = (s["ll_model"](x) - y) * m
    return 0.5 * (r**2).sum() / m.sum()


def pad(x, y):
    """``((x, mask), y)`` with three padding rows (large values, mask 0) appended."""
    k = 3
    x = torch.cat([x, 7.0 * torch.ones(k, D, dtype=DTYPE)])
    m = torch.cat([torch.ones(len(y), dtype=DTYPE), torch.zeros(k, dtype=DTYPE)])
    return (x, m), torch.cat([y, -5.0 * torch.ones(k, dtype=DTYPE)])


def fit_bce(s):
    return F.binary_cross_entropy_with_logits(s["ll_model"](s["data"]), s["target"])


def fit_ce(s):
    """Two-class cross-entropy with logits (0, x.w): the same loss as ``fit_bce``."""
    z = s["ll_model"](s["data"])
    return F.cross_entropy(torch.stack([torch.zeros_like(z), z], -1), s["target"])


ENCODINGS = {
    "plain": (fit_plain, lambda x, y: (x, y)),
    "dict_no_target": (fit_dict, lambda x, y: ({"x": x, "y": y}, None)),
    "tuple_x_mask": (fit_mask, pad),
    "float_labels": (fit_bce, lambda x, y: (x, (y > 0).to(DTYPE))),
    "int_labels": (fit_ce, lambda x, y: (x, (y > 0).long())),
}


def objectives(fit):
    """LL: fit + per-feature L2; UL: fit + a small direct term (so that FirstOrder and the
    first-order methods have a direct UL gradient)."""

    def ll_objective(s):
        return fit(s) + s["ul_model"].penalty(s["ll_model"])

    def ul_objective(s):
        return fit(s) + 1e-2 * (s["ul_model"].log_l2 ** 2).sum()

    return ll_objective, ul_objective


# --- every method: (class, its options, the LL optimizer's options) ----------------------------

CG_ITERS = {"iters": 60}  # converged enough for the implicit methods' stationarity check
CALCULATORS = {
    "Reverse": (Reverse, {}, {}),
    "Truncated": (Truncated, {"truncate_iter": 3}, {}),
    "Implicit-cg": (Implicit, {"k": 20, "method": "cg"}, CG_ITERS),
    "Implicit-minres": (Implicit, {"k": 20, "method": "minres"}, CG_ITERS),
    "Implicit-normal_cg": (Implicit, {"k": 20, "method": "normal_cg"}, CG_ITERS),
    "Implicit-fixed_point": (Implicit, {"k": 20, "method": "fixed_point"}, CG_ITERS),
    "Implicit-neumann": (Implicit, {"k": 20, "method": "neumann"}, CG_ITERS),
    "Implicit-damped": (Implicit, {"k": 20, "method": "cg", "damping": 0.1}, CG_ITERS),
    "Forward": (Forward, {}, {}),
    "MemorySavingReverse": (MemorySavingReverse, {}, {}),
    "FirstOrder": (FirstOrder, {}, {}),
    "PTT": (PTT, {}, {}),
    "FiniteDifference": (FiniteDifference, {}, {"iters": 1}),
    "IGA": (IGA, {}, {"iters": 3}),
    "StochasticImplicit": (
        StochasticImplicit,
        {"steps": 20, "batches": None, "cross": "full"},
        CG_ITERS,
    ),
}
ONE_LL_STATE = {
    "DM": (DM, {}, {"iters": 3}),
    "BOME": (BOME, {}, {"iters": 3}),
    "PBGD": (PBGD, {}, {"iters": 3}),
    "BVFIM": (BVFIM, {}, {"iters": 3}),
    "MESO": (MESO, {}, {"iters": 3}),
    "GAFFO": (GAFFO, {}, {"iters": 3}),
    "F2SA": (F2SA, {}, {"iters": 3}),
    "Alternating": (Alternating, {}, {"iters": 3}),
    "SOBA": (SOBA, {"batch_size": None}, {"iters": 1}),
    "SABA": (SABA, {"batch_size": None}, {"iters": 1}),
    "StocBiO": (StocBiO, {"batch_size": None}, {"iters": 3}),
    "AmIGO": (AmIGO, {"batch_size": None}, {"iters": 3}),
}
METHODS = {**CALCULATORS, **ONE_LL_STATE}


def build(method, ll_objective, ul_objective, dtype=DTYPE):
    """``(problem, ll_model, ul_model)`` for ``method`` on fresh models."""
    make, options, ll_options = METHODS[method]
    ll_model = Linear(D, torch.tensor(START, dtype=DTYPE)).to(dtype)
    ul_model = FeatureL2(D).to(dtype)
    ll = GradientDescent(ll_objective, ll_model, ul_model, **{"lr": 0.2, "iters": 10, **ll_options})
    ul = make(ul_objective, ul_model, ll_objective, ll_model, **options)
    optimizer = torch.optim.SGD(ul_model.parameters(), lr=UL_LR)
    return BilevelProblem(ll, ul, optimizer), ll_model, ul_model


def run(method, encoding, batches, ll_objective=None, ul_objective=None):
    """Two (or more) UL steps on ``batches`` of ``((x, y), (xv, yv))``, each packed by the
    encoding; returns the LL and UL parameters after them and the UL losses."""
    fit, pack = ENCODINGS[encoding]
    if ll_objective is None:
        ll_objective, ul_objective = objectives(fit)
    problem, ll_model, ul_model = build(method, ll_objective, ul_objective)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # IGA / FiniteDifference notes
        for train, val in batches:
            losses.append(problem.step(pack(*train), pack(*val)))
    return [p.detach().clone() for p in (*ll_model.parameters(), *ul_model.parameters())], losses


def assert_same(out, ref):
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


TWO_STEPS = [(TRAIN, VAL), (TRAIN2, VAL2)]


def test_the_reference_runs_move_the_ul_parameters():
    """The comparisons below are not between two runs that did nothing."""
    start = FeatureL2(D).log_l2.detach()
    for method in METHODS:
        params, losses = run(method, "plain", TWO_STEPS)
        assert (params[-1] - start).abs().max() > 1e-4, method
        assert all(math.isfinite(float(loss)) for loss in losses), method


# --- (a) nested data, no target, integer targets ----------------------------------------------


@pytest.mark.parametrize("encoding", ["dict_no_target", "tuple_x_mask"])
@pytest.mark.parametrize("method", METHODS)
def test_nested_data_gives_the_plain_tensor_answer(method, encoding):
    ref, ref_losses = run(method, "plain", TWO_STEPS)
    out, losses = run(method, encoding, TWO_STEPS)
    assert_same(out, ref)
    assert_same(losses, ref_losses)


@pytest.mark.parametrize("method", METHODS)
def test_integer_class_targets_give_the_float_target_answer(method):
    ref, _ = run(method, "float_labels", TWO_STEPS)
    out, _ = run(method, "int_labels", TWO_STEPS)
    assert_same(out, ref)


def ll_train_keys(s):
    """The LL objective on the train level's own keys: a KeyError if given validation data."""
    d = s["data"]
    r = s["ll_model"](d["x_train"]) - d["y_train"]
    return 0.5 * (r**2).mean() + s["ul_model"].penalty(s["ll_model"])


def ul_val_keys(s):
    d = s["data"]
    r = s["ll_model"](d["x_val"]) - d["y_val"]
    return 0.5 * (r**2).mean() + 1e-2 * (s["ul_model"].log_l2 ** 2).sum()


@pytest.mark.parametrize("method", METHODS)
def test_each_objective_gets_its_own_level_of_data(method):
    """Train (24 rows) and validation (17 rows) data under different keys: a method that
    handed the LL objective the validation data (or the reverse) raises a KeyError."""
    ref, _ = run(method, "plain", TWO_STEPS)
    problem, ll_model, ul_model = build(method, ll_train_keys, ul_val_keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for (x, y), (xv, yv) in TWO_STEPS:
            problem.step(({"x_train": x, "y_train": y}, None), ({"x_val": xv, "y_val": yv}, None))
    assert_same([p.detach() for p in (*ll_model.parameters(), *ul_model.parameters())], ref)


def test_nested_data_matches_the_closed_form_ridge_hypergradient():
    p = ridge(n=30, d=4, seed=2)

    def ll(s):
        d = s["data"]
        r = s["ll_model"](d["x"]) - d["y"]
        return 0.5 * (r**2).mean() + s["ul_model"].penalty(s["ll_model"])

    def ul(s):
        d = s["data"]
        return 0.5 * ((s["ll_model"](d["x"]) - d["y"]) ** 2).mean()

    gd = GradientDescent(ll, p.ll_model, p.ul_model, lr=0.5, iters=300)
    problem = BilevelProblem(gd, Implicit(ul, p.ul_model, ll, p.ll_model, k=20))
    (x, y), (xv, yv) = p.train, p.val
    (grad,) = problem.hypergradient(({"x": x, "y": y}, None), ({"x": xv, "y": yv}, None))
    assert relative_error(grad, ridge_exact_hypergradient(p)) < 1e-9


# --- (c) the same object for both levels, views, in-place mutation --------------------------


def transposed_view(pair):
    x, y = pair
    view = x.T.contiguous().T
    assert not view.is_contiguous()
    return view, y


@pytest.mark.parametrize("method", METHODS)
def test_validation_data_reused_as_train_data(method):
    clone = (TRAIN[0].clone(), TRAIN[1].clone())
    ref, _ = run(method, "plain", [(TRAIN, clone), (TRAIN2, VAL2)])
    out, _ = run(method, "plain", [(TRAIN, TRAIN), (TRAIN2, VAL2)])
    assert_same(out, ref)


@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_data(method):
    ref, _ = run(method, "plain", TWO_STEPS)
    views = [(transposed_view(t), transposed_view(v)) for t, v in TWO_STEPS]
    out, _ = run(method, "plain", views)
    assert_same(out, ref)


@pytest.mark.parametrize("method", METHODS)
def test_data_mutated_in_place_between_two_ul_steps_is_read_again(method):
    ref, _ = run(method, "plain", TWO_STEPS)
    ll_objective, ul_objective = objectives(fit_plain)
    problem, ll_model, ul_model = build(method, ll_objective, ul_objective)
    train = tuple(t.clone() for t in TRAIN)
    val = tuple(t.clone() for t in VAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        problem.step(train, val)
        for mine, new in zip((*train, *val), (*TRAIN2, *VAL2), strict=True):
            mine.copy_(new)
        problem.step(train, val)
    assert_same([p.detach() for p in (*ll_model.parameters(), *ul_model.parameters())], ref)


# --- minibatch methods: the same rows of every member ---------------------------------------

Rows = namedtuple("Rows", ["y", "id"])
MINIBATCH = {
    "SOBA": (SOBA, 1),
    "SABA": (SABA, 1),
    "StocBiO": (StocBiO, 3),
    "AmIGO": (AmIGO, 3),
}


def aligned_objectives(full):
    """Objectives that check that every member of a drawn batch holds the rows ``id`` of the
    full data of its level, then compute the plain ridge objectives."""

    def check(level, data, target):
        x_full, y_full = full[level]
        rows = data["id"]
        assert torch.equal(data["x"], x_full[rows]), level
        assert torch.equal(data["pair"][0], x_full[rows, 0]), level
        assert torch.equal(data["list"][0], y_full[rows]), level
        assert torch.equal(target.y, y_full[rows]) and torch.equal(target.id, rows), level

    def ll_objective(s):
        check("train", s["data"], s["target"])
        r = s["ll_model"](s["data"]["x"]) - s["target"].y
        return 0.5 * (r**2).mean() + s["ul_model"].penalty(s["ll_model"])

    def ul_objective(s):
        check("val", s["data"], s["target"])
        r = s["ll_model"](s["data"]["x"]) - s["target"].y
        return 0.5 * (r**2).mean() + 1e-2 * (s["ul_model"].log_l2 ** 2).sum()

    return ll_objective, ul_objective


def nested(x, y):
    rows = torch.arange(len(y))
    return {"x": x, "id": rows, "pair": (x[:, 0], None), "list": [y]}, Rows(y, rows)


def minibatch_run(method, ll_objective, ul_objective, train, val, steps=4):
    make, iters = MINIBATCH[method]
    ll_model = Linear(D, torch.tensor(START, dtype=DTYPE))
    ul_model = FeatureL2(D)
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=0.2, iters=iters)
    ul = make(ul_objective, ul_model, ll_objective, ll_model, batch_size=5, val_batch_size=4)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=UL_LR))
    for _ in range(steps):
        problem.step(train, val)
    return [p.detach().clone() for p in (*ll_model.parameters(), *ul_model.parameters())]


@pytest.mark.parametrize("method", MINIBATCH)
def test_minibatches_take_the_same_rows_of_every_nested_member(method):
    """Batches of 5 (train, 24 rows: unequal batches) and 4 (validation, 17 rows); every
    member (dict, tuple, list, named-tuple target) must hold the same rows, and the run must
    be the plain-tensor run with the same seed."""
    ref = minibatch_run(method, *objectives(fit_plain), TRAIN, VAL)
    full = {"train": TRAIN, "val": VAL}
    out = minibatch_run(method, *aligned_objectives(full), nested(*TRAIN), nested(*VAL))
    assert_same(out, ref)


@pytest.mark.parametrize("method", MINIBATCH)
def test_minibatches_from_views_and_from_one_object_for_both_levels(method):
    ll_objective, ul_objective = objectives(fit_plain)
    clone = (TRAIN[0].clone(), TRAIN[1].clone())
    ref = minibatch_run(method, ll_objective, ul_objective, TRAIN, clone)
    out = minibatch_run(method, ll_objective, ul_objective, TRAIN, TRAIN)
    assert_same(out, ref)
    views = minibatch_run(
        method, ll_objective, ul_objective, transposed_view(TRAIN), transposed_view(clone)
    )
    assert_same(views, ref)


def masked_row_objectives():
    """Per-row objectives on ``((x, mask), y)`` (train) and ``({"x", "m"}, y)`` (val): the
    mean over the batch's rows of ``(m (x.w - y))^2 / 2``."""

    def ll_objective(s):
        (x, m), y = s["data"], s["target"]
        return 0.5 * ((m * (s["ll_model"](x) - y)) ** 2).mean() + s["ul_model"].penalty(
            s["ll_model"]
        )

    def ul_objective(s):
        d, y = s["data"], s["target"]
        return 0.5 * ((d["m"] * (s["ll_model"](d["x"]) - y)) ** 2).mean()

    return ll_objective, ul_objective


def test_soba_first_step_by_hand_from_the_sampler_rows():
    """One SOBA step from the rows of the sampler's first draws (seed 3; train batches of 5
    of 24 rows, whose sizes differ, so each carries its weight count * size / n):
    ``y1 = y0 - rho w_i grad G_i(y0)``, ``v1 = -rho w_j grad_y F_j(y0)``."""
    g = torch.Generator().manual_seed(11)
    (x, y), (xv, yv) = TRAIN, VAL
    m = (torch.rand(N_TRAIN, generator=g) < 0.7).to(DTYPE)
    mv = (torch.rand(N_VAL, generator=g) < 0.7).to(DTYPE)
    ll_objective, ul_objective = masked_row_objectives()
    ll_model = Linear(D, torch.tensor(START, dtype=DTYPE))
    ul_model = FeatureL2(D)
    rho = 0.2
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=rho, iters=1)
    ul = SOBA(
        ul_objective, ul_model, ll_objective, ll_model, batch_size=5, val_batch_size=4, seed=3
    )
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=UL_LR))
    problem.step(((x, m), y), ({"x": xv, "m": mv}, yv))

    sampler = Sampler(5, 4, seed=3)  # the same draws: train first, then validation
    i = sampler.draw("train", N_TRAIN).index
    j = sampler.draw("val", N_VAL).index
    weight_i = math.ceil(N_TRAIN / 5) * len(i) / N_TRAIN
    weight_j = math.ceil(N_VAL / 4) * len(j) / N_VAL
    y0 = torch.tensor(START, dtype=DTYPE)
    l2 = ul_model.log_l2.detach().exp()  # log_l2 is not moved by the first step (v0 = 0)
    xi, mi = x[i], m[i]
    grad_g = xi.T @ (mi**2 * (xi @ y0 - y[i])) / len(i) + l2 * y0
    xj, mj = xv[j], mv[j]
    grad_f = xj.T @ (mj**2 * (xj @ y0 - yv[j])) / len(j)
    torch.testing.assert_close(ll_model.w.detach(), y0 - rho * weight_i * grad_g, **TOL)
    torch.testing.assert_close(ul.v[0], -rho * weight_j * grad_f, **TOL)


def test_stochastic_implicit_minibatch_rows_by_hand():
    """StochasticImplicit(batches=5): data and target rows drawn together (checked in the
    objective), and the solve by hand from the same draws: ``q <- q - alpha (H_b q - v)``
    with ``H_b = x_b'x_b / 5 + diag(l2)``."""
    p = ridge(n=N_TRAIN, d=D, seed=4)
    x, y = p.train
    xv, yv = p.val
    seen = []

    def ll_objective(s):
        data, target = s["data"], s["target"]
        rows = (data[:, None, :] == x[None]).all(-1).nonzero()[:, 1]  # rows of x are distinct
        assert len(rows) == len(data) and torch.equal(target, y[rows])
        seen.append(len(rows))
        r = s["ll_model"](data) - target
        return 0.5 * (r**2).mean() + s["ul_model"].penalty(s["ll_model"])

    def ul_objective(s):
        return 0.5 * ((s["ll_model"](s["data"]) - s["target"]) ** 2).mean()

    alpha, steps, seed, lr, iters = 0.1, 4, 7, 0.5, 80
    ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=lr, iters=iters)
    ul = StochasticImplicit(
        ul_objective,
        p.ul_model,
        ll_objective,
        p.ll_model,
        solver_optimizer=lambda q: torch.optim.SGD(q, lr=alpha),
        steps=steps,
        batches=5,
        seed=seed,
    )
    (grad,) = BilevelProblem(ll, ul).hypergradient(p.train, p.val)
    assert 5 in seen

    l2 = p.l2
    w = torch.zeros(D, dtype=DTYPE)
    for _ in range(iters):
        w = w - lr * (x.T @ (x @ w - y) / N_TRAIN + l2 * w)
    v = xv.T @ (xv @ w - yv) / len(xv)
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(D, dtype=DTYPE)
    for _ in range(steps):
        xb = x[torch.randperm(N_TRAIN, generator=g)[:5]]
        q = q - alpha * ((xb.T @ xb / 5 + torch.diag(l2)) @ q - v)
    expected = -(l2 * w) * q  # the cross term's draw does not enter: dg/dlog_l2 = l2 * w
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", MINIBATCH)
@pytest.mark.parametrize("where", ["train member", "val target"])
def test_minibatch_methods_refuse_members_of_different_lengths(method, where):
    ll_objective, ul_objective = objectives(fit_mask)
    (x, y), (xv, yv) = TRAIN, VAL
    ones, ones_v = torch.ones(N_TRAIN, dtype=DTYPE), torch.ones(N_VAL, dtype=DTYPE)
    train, val = ((x, ones), y), ((xv, ones_v), yv)
    if where == "train member":
        train = ((x, ones[:-1]), y)
    else:
        val = ((xv, ones_v), torch.cat([yv, yv[:1]]))
    make, iters = MINIBATCH[method]
    ll_model, ul_model = Linear(D), FeatureL2(D)
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=0.2, iters=iters)
    ul = make(ul_objective, ul_model, ll_objective, ll_model, batch_size=5)
    problem = BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=UL_LR))
    with pytest.raises(ValueError, match="different numbers of samples"):
        problem.step(train, val)
    assert torch.equal(ll_model.w.detach(), torch.zeros(D, dtype=DTYPE))


def test_stochastic_implicit_int_batches_refuse_what_they_cannot_draw_rows_from():
    """``batches=<int>`` draws the same rows of every tensor in (data, target), as the other
    methods' samplers (nested data and no target: tests/test_refusals_review3.py); a member
    without rows is refused with the cure (a callable ``batches``), and so are a data and a
    target of different lengths; never a draw of unrelated rows."""
    ll_objective, ul_objective = objectives(fit_dict)
    ll_model, ul_model = Linear(D), FeatureL2(D)
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=0.5, iters=5)
    ul = StochasticImplicit(ul_objective, ul_model, ll_objective, ll_model, batches=5)
    problem = BilevelProblem(ll, ul)
    (x, y), (xv, yv) = TRAIN, VAL
    with pytest.raises(TypeError, match="a callable batches"):
        problem.hypergradient(({"x": x, "y": y, "name": "a"}, None), ({"x": xv, "y": yv}, None))
    with pytest.raises(ValueError, match="one row per sample"):
        ul.draw((x, y[:-1]))


# --- (b) task batches ---------------------------------------------------------------------------

TASKS = 3
_g = torch.Generator().manual_seed(5)
TASK_X = torch.randn(TASKS, 12, D, generator=_g, dtype=DTYPE)
TASK_Y = torch.randn(TASKS, 12, generator=_g, dtype=DTYPE)
TASK_XV = torch.randn(TASKS, 7, D, generator=_g, dtype=DTYPE)
TASK_YV = torch.randn(TASKS, 7, generator=_g, dtype=DTYPE)
TASK_BATCH = {"train": (TASK_X, TASK_Y), "test": (TASK_XV, TASK_YV)}


def task_mean(problem, train_of, val_of):
    """The mean over tasks of ``problem.hypergradient`` (one task at a time)."""
    grads = [problem.hypergradient(train_of(i), val_of(i)) for i in range(TASKS)]
    return [torch.stack(g).mean(0) for g in zip(*grads, strict=True)]


def meta_step_direction(problem, ul_model, batch):
    """``meta_step`` with SGD: the averaged hypergradient it stepped along."""
    before = [p.detach().clone() for p in ul_model.parameters()]
    problem.meta_step(batch)
    return [(b - a.detach()) / UL_LR for a, b in zip(ul_model.parameters(), before, strict=True)]


def flipped(batch):
    return {k: tuple(t.flip(0) for t in pair) for k, pair in batch.items()}


@pytest.mark.parametrize("method", CALCULATORS)
def test_meta_step_is_the_mean_of_the_task_hypergradients_in_any_order(method):
    problem, _, ul_model = build(method, *objectives(fit_plain))
    views = {  # non-contiguous tasks: slices of (examples, tasks, ...) storage
        key: tuple(t.transpose(0, 1).contiguous().transpose(0, 1) for t in pair)
        for key, pair in TASK_BATCH.items()
    }
    assert not views["train"][0].is_contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = task_mean(
            problem, lambda i: (TASK_X[i], TASK_Y[i]), lambda i: (TASK_XV[i], TASK_YV[i])
        )
        reversed_order = problem.meta_hypergradient(flipped(TASK_BATCH))
        from_views = problem.meta_hypergradient(views)
        stepped = meta_step_direction(problem, ul_model, TASK_BATCH)
    assert_same(reversed_order, mean)
    assert_same(from_views, mean)
    assert_same(stepped, mean)


def prox_objective(s):
    """iMAML's LL objective: task loss + (2/2) ||w - theta||^2."""
    (w,) = s["ll_model"].parameters()
    return fit_plain(s) + ((w - s["ul_model"].w) ** 2).sum()


MAML = {
    "Reverse": (Reverse, fit_plain, 5),
    "Forward": (Forward, fit_plain, 5),
    "MemorySavingReverse": (MemorySavingReverse, fit_plain, 5),
    "FirstOrder": (FirstOrder, fit_plain, 5),
    "Reptile": (Reptile, fit_plain, 5),
    "PTT": (PTT, fit_plain, 5),
    "FiniteDifference": (FiniteDifference, fit_plain, 1),
    "Implicit-iMAML": (Implicit, prox_objective, 40),
}


@pytest.mark.parametrize("method", MAML)
def test_meta_learned_initialization_meta_step_is_the_task_mean(method):
    """UL parameters that are the LL's initial weights: no task's adapted weights may leak
    into the next task's start."""
    make, ll_objective, iters = MAML[method]
    net = Linear(D, torch.tensor(START, dtype=DTYPE))
    ll = GradientDescent(ll_objective, net, net, lr=0.2, iters=iters)
    problem = BilevelProblem(
        ll, make(fit_plain, net, ll_objective, net), torch.optim.SGD(net.parameters(), lr=UL_LR)
    )
    mean = task_mean(problem, lambda i: (TASK_X[i], TASK_Y[i]), lambda i: (TASK_XV[i], TASK_YV[i]))
    assert_same(problem.meta_hypergradient(flipped(TASK_BATCH)), mean)
    assert_same(meta_step_direction(problem, net, TASK_BATCH), mean)


@pytest.mark.parametrize("method", ONE_LL_STATE)
def test_methods_with_one_ll_state_refuse_several_tasks_and_change_nothing(method):
    problem, ll_model, ul_model = build(method, *objectives(fit_plain))
    before = [p.detach().clone() for p in (*ll_model.parameters(), *ul_model.parameters())]
    for call in (problem.meta_step, problem.meta_hypergradient):
        with pytest.raises(ValueError, match=f"{method} keeps one LL state.*batch of 3 tasks"):
            call(TASK_BATCH)
    assert_same([p.detach() for p in (*ll_model.parameters(), *ul_model.parameters())], before)


@pytest.mark.parametrize("method", ONE_LL_STATE)
def test_methods_with_one_ll_state_take_a_one_task_batch_as_a_step(method):
    one = {k: tuple(t[:1] for t in pair) for k, pair in TASK_BATCH.items()}
    stepped, ll_model, ul_model = build(method, *objectives(fit_plain))
    stepped.step((TASK_X[0], TASK_Y[0]), (TASK_XV[0], TASK_YV[0]))
    ref = [p.detach() for p in (*ll_model.parameters(), *ul_model.parameters())]
    batched, ll_model, ul_model = build(method, *objectives(fit_plain))
    batched.meta_step(one)
    assert_same([p.detach() for p in (*ll_model.parameters(), *ul_model.parameters())], ref)


def task_batch_or_clear_refusal(problem, batch, mean):
    """A task batch with nested data must give the mean of the tasks' hypergradients, or be
    refused with an error that says what a task batch must hold (not a raw KeyError /
    TypeError from indexing, and never a wrong number)."""
    try:
        got = problem.meta_hypergradient(batch)
    except (TypeError, ValueError) as error:
        assert "task batch" in str(error), f"unclear refusal: {type(error).__name__}: {error}"
        return
    assert_same(got, mean)


def two_input_objectives():
    """Data ``(x_a, x_b)``: two inputs per example (a siamese pair); the model reads
    ``x_a - x_b``."""

    def fit(s):
        (xa, xb), y = s["data"], s["target"]
        return 0.5 * ((s["ll_model"](xa - xb) - y) ** 2).mean()

    return objectives(fit)


def test_task_batch_with_tuple_data_is_split_per_task_not_per_member():
    """A task batch of 2 tasks whose data are pairs ``(x_a, x_b)``, each of shape
    ``(tasks, examples, d)``. Splitting the tuple itself (``data[i]``) hands task 0 the
    pair ``(x_a[0], x_a[1])``: a wrong hypergradient, silently."""
    g = torch.Generator().manual_seed(9)
    tasks = 2
    xa, xb = (torch.randn(tasks, 12, D, generator=g, dtype=DTYPE) for _ in range(2))
    qa, qb = (torch.randn(tasks, 7, D, generator=g, dtype=DTYPE) for _ in range(2))
    y = torch.randn(tasks, 12, generator=g, dtype=DTYPE)
    yq = torch.randn(tasks, 7, generator=g, dtype=DTYPE)
    problem, _, _ = build("Reverse", *two_input_objectives())
    grads = [
        problem.hypergradient(((xa[i], xb[i]), y[i]), ((qa[i], qb[i]), yq[i])) for i in range(tasks)
    ]
    mean = [torch.stack(t).mean(0) for t in zip(*grads, strict=True)]
    batch = {"train": ((xa, xb), y), "test": ((qa, qb), yq)}
    task_batch_or_clear_refusal(problem, batch, mean)


@pytest.mark.parametrize("layout", ["dict_no_target", "int_labels"])
def test_task_batch_with_dict_data_or_no_target_or_class_labels(layout):
    if layout == "int_labels":
        problem, _, _ = build("Reverse", *objectives(fit_ce))
        labels, labels_v = (TASK_Y > 0).long(), (TASK_YV > 0).long()
        mean = task_mean(
            problem, lambda i: (TASK_X[i], labels[i]), lambda i: (TASK_XV[i], labels_v[i])
        )
        assert_same(
            problem.meta_hypergradient({"train": (TASK_X, labels), "test": (TASK_XV, labels_v)}),
            mean,
        )
        return
    problem, _, _ = build("Reverse", *objectives(fit_dict))
    mean = task_mean(
        problem,
        lambda i: ({"x": TASK_X[i], "y": TASK_Y[i]}, None),
        lambda i: ({"x": TASK_XV[i], "y": TASK_YV[i]}, None),
    )
    batch = {
        "train": ({"x": TASK_X, "y": TASK_Y}, None),
        "test": ({"x": TASK_XV, "y": TASK_YV}, None),
    }
    task_batch_or_clear_refusal(problem, batch, mean)


# --- (d) data of another dtype than the models ------------------------------------------------

WHERE = ["train data", "train target", "val data", "val target"]


def batches_for(model_dtype, where, other_dtype, nested):
    (x, y), (xv, yv) = TRAIN, VAL
    values = {"train data": x, "train target": y, "val data": xv, "val target": yv}
    values = {k: v.to(other_dtype if k == where else model_dtype) for k, v in values.items()}
    if nested:
        train = ({"x": values["train data"], "y": values["train target"]}, None)
        val = ({"x": values["val data"], "y": values["val target"]}, None)
    else:
        train = (values["train data"], values["train target"])
        val = (values["val data"], values["val target"])
    return train, val


def elementwise_fit(s):
    """Ridge written elementwise (``(x * w).sum(-1)``), as many objectives are: PyTorch's
    type promotion then mixes float32 and float64 without an error of its own."""
    d = s["data"]
    (w,) = s["ll_model"].parameters()
    return 0.5 * (((d["x"] * w).sum(-1) - d["y"]) ** 2).mean()


def elementwise_plain_fit(s):
    (w,) = s["ll_model"].parameters()
    return 0.5 * (((s["data"] * w).sum(-1) - s["target"]) ** 2).mean()


DIRECTIONS = [(torch.float64, torch.float32), (torch.float32, torch.float64)]
DIRECTION_IDS = ["f64_models_f32_data", "f32_models_f64_data"]


def refused_without_a_step(problem, ll_model, ul_model, train, val, what):
    before = [p.detach().clone() for p in (*ll_model.parameters(), *ul_model.parameters())]
    try:
        problem.step(train, val)
    except ValueError as error:
        assert re.search(r"dtype torch\.float.*convert it", str(error)), str(error)
    else:
        raise AssertionError(f"{what} of another dtype than the models was run, not refused")
    after = [p.detach() for p in (*ll_model.parameters(), *ul_model.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), what


@pytest.mark.parametrize(("model_dtype", "data_dtype"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_data_of_another_dtype_is_refused_with_the_cure(method, model_dtype, data_dtype):
    """Each of the four tensors in turn in another floating dtype than the models: refused
    before any work, naming the cure; never run in a promoted dtype (the objectives here
    would run: they are elementwise, so float32 and float64 mix without an error)."""
    problem, ll_model, ul_model = build(
        method, *objectives(elementwise_plain_fit), dtype=model_dtype
    )
    for where in WHERE:
        train, val = batches_for(model_dtype, where, data_dtype, nested=False)
        refused_without_a_step(problem, ll_model, ul_model, train, val, where)


@pytest.mark.parametrize(("model_dtype", "data_dtype"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("method", ["Reverse", "SOBA"])
def test_nested_data_of_another_dtype_is_refused_with_the_cure(method, model_dtype, data_dtype):
    """The same inside a dict ``{"x": .., "y": ..}`` (target None): the check must look
    inside nested data as it does at the top level."""
    problem, ll_model, ul_model = build(method, *objectives(elementwise_fit), dtype=model_dtype)
    for where in WHERE:
        train, val = batches_for(model_dtype, where, data_dtype, nested=True)
        refused_without_a_step(problem, ll_model, ul_model, train, val, f"nested {where}")


@pytest.mark.parametrize("method", ["Reverse", "Implicit-cg", "IGA"])
def test_compute_gradients_refuses_data_of_another_dtype(method):
    """The calculator API ``compute_gradients(validate_data, validate_target, aux,
    train_data, train_target)``: the LL run checked its own data, but the validation pair
    (and the train pair, which Implicit and IGA read again) must be checked too."""
    ll_objective, ul_objective = objectives(elementwise_plain_fit)
    problem, _, _ = build(method, ll_objective, ul_objective)
    ul, ll = problem.ul, problem.ll
    for where in ("val target", "val data", "train target", "train data"):
        train, val = batches_for(DTYPE, where, torch.float32, nested=False)
        trajectory = ul.run_ll(ll, *TRAIN)  # the LL on float64 data (checked there)
        try:
            ul.compute_gradients(*val, trajectory.model, *train)
        except ValueError as error:
            assert re.search(r"dtype torch\.float32.*convert it", str(error)), str(error)
        else:
            raise AssertionError(f"compute_gradients ran with a float32 {where}, not refused")

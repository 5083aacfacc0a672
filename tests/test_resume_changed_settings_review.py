"""Review of the settings a checkpoint holds as changed since construction (float64, exact).

FOUND:

- A damaged ``changed_settings["kept_out"]`` (an int, a string, a list of non-names) was not
  checked: an int raised a bare ``TypeError`` after the load had been applied (the problem
  left loaded, the caller told it failed), a string was warned about letter by letter. It is
  now refused as damaged before any change, as the rest of ``changed_settings`` is.
- A setting whose check fails with another error than ``TypeError``/``ValueError``/
  ``AttributeError`` (``float(10**400)`` raises ``OverflowError``) escaped as that bare error,
  not naming the setting nor the cure. Any refusal of a setter is now reported by name.
- ``FiniteDifference.r`` (a property with a setter, documented as settable between steps, as
  ``ll.iters`` is) was not recorded: a run that changed it mid-run resumed with the value it
  was built with, silently. The settings recorded are now the ``Setting`` attributes and the
  properties with a setter kept in ``_<name>``.
- A setting set to a NumPy scalar (``ul.alpha = np.float64(0.1)``, from ``np.linspace``) was
  taken for a value a file cannot hold: the load warned "set it again", and the resumed run
  went on with the built value unless the script did, although
  :func:`bilevel.checkpoint.plain` writes it as a float.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from problems import ridge, ridge_ll, ridge_ul
from test_resume_changed_settings import f2sa_problem, run

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import FiniteDifference, Implicit

LR = 0.3


def quartic_ll(state: dict) -> torch.Tensor:
    """Squared error / 2 plus ``exp(log_l2) * w**4 / 4``: a mixed derivative that is not linear
    in the weights, so that the finite-difference radius changes the hypergradient."""
    w = state["ll_model"].w
    residual = state["ll_model"](state["data"]) - state["target"]
    return 0.5 * (residual**2).mean() + 0.25 * (state["ul_model"].log_l2.exp() * w**4).sum()


def finite_difference_problem(p) -> BilevelProblem:
    with torch.no_grad():
        p.ll_model.w.fill_(0.5)
    ll = GradientDescent(quartic_ll, p.ll_model, p.ul_model, lr=0.1, iters=1)
    ul = FiniteDifference(ridge_ul, p.ul_model, quartic_ll, p.ll_model, r=0.01)
    return BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.5))


def neumann_problem(p) -> BilevelProblem:
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=LR, iters=30)
    ul = Implicit(
        ridge_ul, p.ul_model, ridge_ll, p.ll_model, k=5, method="neumann", alpha=0.3,
        stationarity_warning=None,
    )  # fmt: skip
    return BilevelProblem(ll, ul, torch.optim.SGD(p.ul_model.parameters(), lr=0.5))


def set_radius(problem: BilevelProblem, step: int) -> None:
    if step == 1:
        problem.ul.r = 0.3


def set_numpy_alpha(problem: BilevelProblem, step: int) -> None:
    if step == 1:
        problem.ul.alpha = np.linspace(0.1, 0.2, 3)[0]  # a NumPy float64


@pytest.mark.parametrize(
    ("build", "change"),
    [(finite_difference_problem, set_radius), (neumann_problem, set_numpy_alpha)],
)
def test_a_setting_changed_mid_run_resumes_with_that_value(tmp_path, build, change):
    whole = run(build, change, ridge(seed=3), 4)
    run(build, change, ridge(seed=3), 2).save_checkpoint(tmp_path / "run.pt")
    q = ridge(seed=3)
    resumed = build(q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to set again by hand: the file holds it
        resumed.load_checkpoint(tmp_path / "run.pt")
    run(build, change, q, 4, resumed)
    assert resumed._changeable() == whole._changeable()
    for a, b in zip(whole.ul.ul_params, resumed.ul.ul_params, strict=True):
        assert torch.equal(a, b)


def _refused_unchanged(state: dict, match: str) -> None:
    """Loading ``state`` into a new problem raises ``ValueError`` matching ``match`` and leaves
    the problem, its settings and the RNG as they were."""
    q = ridge(seed=5)
    fresh = f2sa_problem(q)
    fresh.ll.growth_tolerance = 0.5  # the user's own change, before the load
    settings = fresh._changeable()
    weights = [t.clone() for t in (*q.ul_model.parameters(), *q.ll_model.parameters())]
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(state)
    assert fresh._changeable() == settings and fresh.step_count == 0
    now = (*q.ul_model.parameters(), *q.ll_model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(weights, now, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)


def _changed_state() -> dict:
    p = ridge(seed=5)
    problem = f2sa_problem(p)
    problem.step(p.train, p.val)
    problem.ll.iters = 5  # a change the load would make
    problem.step(p.train, p.val)
    torch.manual_seed(123)  # (the state's RNG differs from the fresh problem's)
    return problem.state_dict()


@pytest.mark.parametrize("kept_out", [5, "ul.mu", [1], None])
def test_a_damaged_kept_out_is_refused_before_any_change(kept_out):
    state = _changed_state()
    state["changed_settings"]["kept_out"] = kept_out
    _refused_unchanged(state, r"'changed_settings' is damaged.*Restore the file from a copy")


def test_a_setting_whose_check_overflows_is_refused_by_name():
    state = _changed_state()
    state["changed_settings"]["ul"]["lam_growth"] = 10**400
    _refused_unchanged(state, r"ul\.lam_growth = 1000.*refuses: .*restore it from a copy")

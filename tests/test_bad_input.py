"""Bad input gets a clear exception or warning that names the argument."""

from __future__ import annotations

import pytest
import torch
from problems import DTYPE, FeatureL2, Linear, ridge, ridge_ll, ridge_ul
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import Implicit, Reverse, Truncated


def hypergradient(p, ll_objective=ridge_ll, ul_objective=ridge_ul, ul_cls=Reverse):
    ll = GradientDescent(ll_objective, p.ll_model, p.ul_model, lr=0.1, iters=3)
    ul = ul_cls(ul_objective, p.ul_model, ll_objective, p.ll_model)
    return BilevelProblem(ll, ul).hypergradient(p.train, p.val)


@pytest.mark.parametrize(
    ("objective", "error", "match"),
    [
        (lambda s: 1.0, TypeError, "returned float"),
        (lambda s: [ridge_ll(s)], TypeError, "returned list"),
        (lambda s: (s["ll_model"](s["data"]) - s["target"]) ** 2, ValueError, r"shape \(60,\)"),
        (lambda s: ridge_ll(s).detach(), ValueError, "no path"),
        (lambda s: torch.tensor(1.0, dtype=DTYPE), ValueError, "no path"),
    ],
)
def test_bad_ll_objective(objective, error, match):
    with pytest.raises(error, match=match) as err:
        hypergradient(ridge(), ll_objective=objective)
    assert "ll_objective" in str(err.value)


@pytest.mark.parametrize(
    ("objective", "error", "match"),
    [
        (lambda s: "loss", TypeError, "returned str"),
        (lambda s: s["ll_model"](s["data"]), ValueError, "reduce it"),
    ],
)
def test_bad_ul_objective(objective, error, match):
    with pytest.raises(error, match=match) as err:
        hypergradient(ridge(), ul_objective=objective)
    assert "ul_objective" in str(err.value)


def test_nan_ul_loss():
    with pytest.raises(FloatingPointError, match="UL loss"):
        hypergradient(ridge(), ul_objective=lambda s: ridge_ul(s) * float("nan"))


def test_model_without_parameters():
    p = ridge()
    with pytest.raises(ValueError, match="ll_model has no parameters"):
        GradientDescent(ridge_ll, nn.ReLU(), p.ul_model, lr=0.1, iters=3)
    with pytest.raises(ValueError, match="ul_model has no parameters"):
        Reverse(ridge_ul, nn.ReLU(), ridge_ll, p.ll_model)
    with pytest.raises(TypeError, match=r"ul_model must be a torch\.nn\.Module"):
        Reverse(ridge_ul, object(), ridge_ll, p.ll_model)


@pytest.mark.filterwarnings("ignore:The LL gradient at the auxiliary model")  # short LL here
def test_unused_ul_parameter_is_refused():
    p = ridge()

    class WithSpare(FeatureL2):
        def __init__(self):
            super().__init__(5)
            self.spare = nn.Parameter(torch.zeros(2, dtype=DTYPE))

    p.ul_model = WithSpare()
    with pytest.raises(ValueError, match=r"\['spare'\].*silently zero"):
        hypergradient(p)
    with pytest.raises(ValueError, match=r"\['spare'\].*Implicit"):
        hypergradient(p, ul_cls=lambda *a: Implicit(*a, ll_learning_rate=0.1, k=3))


def test_unused_ll_parameter_is_refused():
    p = ridge()
    p.ll_model.extra = nn.Parameter(torch.zeros(1, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"ll_model parameter\(s\) \['extra'\]"):
        hypergradient(p)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": 2.5}, "k must be an integer >= 1"),
        ({"tolerance": -1e-3}, "tolerance must be a number >= 0"),
        ({"ll_learning_rate": -0.1}, "ll_learning_rate must be a number > 0"),
        ({"method": "lbfgs"}, "method must be one of"),
        ({"alpha": -1.0}, "alpha must be None, 'auto' or a number > 0"),
        ({"on_divergence": "ignore"}, "on_divergence must be"),
    ],
)
def test_bad_implicit_arguments(kwargs, match):
    p = ridge()
    args = {"ll_learning_rate": 0.1, "k": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, **args)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -0.1}, ValueError, r"lr must lie in \(0.0, inf\)"),
        ({"lr": 0.0}, ValueError, "lr must lie in"),
        ({"lr": float("nan")}, ValueError, "lr must lie in"),
        ({"lr": "0.1"}, TypeError, "lr must be a float"),
        ({"lr": torch.ones(4, dtype=DTYPE)}, ValueError, r"schedule of shape \(3,\)"),
        ({"lr": [0.1, 0.2]}, ValueError, "1 trainable parameter tensors"),
        ({"iters": 0}, ValueError, "iters must be an integer >= 1"),
        ({"momentum": 1.0}, ValueError, r"momentum must lie in \[0.0, 1.0\)"),
        ({"optimizer": "nonsuch"}, ValueError, "unknown update rule 'nonsuch'; valid names"),
        ({"optimizer": "adam", "betas": (0.9,)}, ValueError, "betas must be a pair"),
        ({"betas": (0.9, 0.99)}, TypeError, "sgd takes no argument 'betas'"),
        ({"momentum": True}, TypeError, "momentum must be a number, not a bool"),
    ],
)
def test_bad_gradient_descent_arguments(kwargs, error, match):
    p = ridge()
    args = {"lr": 0.1, "iters": 3, **kwargs}
    with pytest.raises(error, match=match):
        GradientDescent(ridge_ll, p.ll_model, p.ul_model, **args)


def test_truncate_iter_must_be_positive():
    p = ridge()
    with pytest.raises(ValueError, match="truncate_iter must be >= 1"):
        Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, truncate_iter=0)


def test_models_with_different_dtypes():
    p = ridge()
    ll_model = Linear(5).float()
    with pytest.raises(ValueError, match=r"dtype.*\.to\("):
        GradientDescent(ridge_ll, ll_model, p.ul_model, lr=0.1, iters=3)
    with pytest.raises(ValueError, match="dtype"):
        Reverse(ridge_ul, p.ul_model, ridge_ll, ll_model)


def test_data_on_another_dtype():
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=3)
    with pytest.raises(ValueError, match=r"data has dtype torch.float32.*\.to\(torch.float64\)"):
        ll.optimize(p.train[0].float(), p.train[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_models_on_different_devices():
    p = ridge()
    with pytest.raises(ValueError, match="cuda"):
        GradientDescent(ridge_ll, Linear(5).cuda(), p.ul_model, lr=0.1, iters=3)
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=3)
    with pytest.raises(ValueError, match="data is on cuda"):
        ll.optimize(p.train[0].cuda(), p.train[1])


def test_wrong_kind_of_auxiliary_model():
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=10, differentiable_steps=0)
    aux = ll.optimize(*p.train)
    reverse = Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    with pytest.raises(ValueError, match=r"last 10 of 10 LL steps.*recorded 0"):
        reverse.compute_gradients(*p.val, aux, *p.train)
    truncated = Truncated(ridge_ul, p.ul_model, ridge_ll, p.ll_model, truncate_iter=3)
    with pytest.raises(ValueError, match="differentiable_steps = 3"):
        truncated.compute_gradients(*p.val, aux, *p.train)
    with pytest.raises(TypeError, match=r"ll\.optimize"):
        reverse.compute_gradients(*p.val, p.ll_model, *p.train)


def test_implicit_on_a_full_graph_warns_about_memory_but_is_exact():
    p = ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.5, iters=200)
    implicit = Implicit(ridge_ul, p.ul_model, ridge_ll, p.ll_model, 0.5, k=10)
    aux = ll.optimize(*p.train)  # the seed flow: a hand-called LL records everything
    with pytest.warns(UserWarning, match="differentiable_steps = 0"):
        implicit.compute_gradients(*p.val, aux, *p.train)
    from problems import ridge_exact_hypergradient

    torch.testing.assert_close(
        p.ul_model.log_l2.grad, ridge_exact_hypergradient(p), rtol=1e-9, atol=0
    )


def test_runner_rejects_mismatched_parts():
    p, q = ridge(), ridge()
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=0.1, iters=3)
    with pytest.raises(ValueError, match="same ll_model and ul_model"):
        BilevelProblem(ll, Reverse(ridge_ul, q.ul_model, ridge_ll, q.ll_model))
    with pytest.raises(TypeError, match=r"ul must be a bilevel\.ul method"):
        BilevelProblem(ll, object())
    problem = BilevelProblem(ll, Reverse(ridge_ul, p.ul_model, ridge_ll, p.ll_model))
    with pytest.raises(ValueError, match="needs a ul_optimizer"):
        problem.step(p.train, p.val)
    with pytest.raises(TypeError, match="task batch"):
        problem.meta_step({"train": p.train})

"""Bad input that a review fed the public API (2026-12-03) and that got through: an online
run whose LL diverges from its first window, online batches that are not pairs or are of
another dtype, ... Each test fails before its fix."""

from __future__ import annotations

import pytest
import torch
from problems import ridge, ridge_hessian, ridge_ll, ridge_ul

from bilevel.ll import GradientDescent, LowerLevelDivergenceError
from bilevel.online import OnlineHypergradient
from bilevel.ul import Forward, Truncated


def _online(p, lr: float, method: str = "forward", hyper_every: int = 2) -> OnlineHypergradient:
    ll = GradientDescent(ridge_ll, p.ll_model, p.ul_model, lr=lr, iters=8)
    args = (ridge_ul, p.ul_model, ridge_ll, p.ll_model)
    ul = Forward(*args) if method == "forward" else Truncated(*args, truncate_iter=hyper_every)
    optimizer = torch.optim.SGD(p.ul_model.parameters(), lr=0.1)
    return OnlineHypergradient(ll, ul, optimizer, hyper_every)


@pytest.mark.parametrize("method", ["forward", "truncated"])
def test_an_online_run_that_diverges_from_its_start_is_refused_before_any_ul_update(method):
    """An LL step size above 2/lambda_max: the first window's losses grow tenfold. It ran on,
    and the UL parameters reached 1e188 (Forward) without an error."""
    p = ridge()
    lambda_max = float(torch.linalg.eigvalsh(ridge_hessian(p)).max())
    start = p.ul_model.log_l2.detach().clone()
    runner = _online(p, lr=4.0 / lambda_max, method=method, hyper_every=4)
    with pytest.raises(LowerLevelDivergenceError, match=f"online {method}, LL steps 1-4: The LL"):
        runner.run(p.train, p.val, 8, progress=False)
    assert torch.equal(p.ul_model.log_l2.detach(), start)  # no UL update from it


def test_an_online_run_with_a_stable_step_is_not_refused():
    p = ridge()
    lambda_max = float(torch.linalg.eigvalsh(ridge_hessian(p)).max())
    _online(p, lr=1.0 / lambda_max).run(p.train, p.val, 8, progress=False)
    assert p.ul_model.log_l2.grad is not None


@pytest.mark.parametrize(
    ("which", "bad", "error", "message"),
    [
        ("val", lambda x, y: x, TypeError, r"val must be a pair \(data, target\)"),
        ("train", lambda x, y: x, TypeError, r"train must be a pair \(data, target\)"),
        ("val", lambda x, y: (x.float(), y.float()), ValueError, r"val\[0\] has dtype"),
        ("train", lambda x, y: (x, y.float()), ValueError, r"train\[1\] has dtype"),
    ],
)
def test_online_batches_are_checked_as_a_step_checks_them(which, bad, error, message):
    """Before: TypeErrors from inside the library (Call.__init__ takes 7 positional
    arguments but 25 were given) or a raw matmul error inside the objective."""
    p = ridge()
    batches = {"train": p.train, "val": p.val}
    batches[which] = bad(*batches[which])
    with pytest.raises(error, match=message):
        _online(p, lr=0.1).run(batches["train"], batches["val"], 4, progress=False)


def test_online_batches_from_a_function_are_checked_each():
    p = ridge()
    x, y = p.train
    batch = lambda step: (x, y) if step < 3 else x  # noqa: E731
    with pytest.raises(TypeError, match=r"train\(3\) must be a pair"):
        _online(p, lr=0.1).run(batch, p.val, 6, progress=False)

"""Every warning names the user's line, whatever the call path (bilevel.user_warnings).

Before, each warning had a fixed ``stacklevel`` that fit one path: under
``BilevelProblem.step`` and ``problem.hypergradient`` the Implicit and FiniteDifference
warnings named ``bilevel/problem.py``, and "once per location" filters keyed on that line.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.ul import IGA, FiniteDifference, Forward, Implicit, Reverse
from bilevel.user_warnings import warn_user

DTYPE = torch.float64


class Linear(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Penalty(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.log_l2 = nn.Parameter(torch.zeros(d, dtype=DTYPE))


def ll_objective(state: dict) -> torch.Tensor:
    model = state["ll_model"]
    fit = F.mse_loss(model(state["data"]), state["target"])
    return fit + 0.5 * (state["ul_model"].log_l2.exp() * model.weight**2).sum()


def ul_objective(state: dict) -> torch.Tensor:
    return F.mse_loss(state["ll_model"](state["data"]), state["target"])


def data(d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, d, generator=g, dtype=DTYPE), torch.randn(40, generator=g, dtype=DTYPE)


def problem(method: type, iters: int, lr: float = 0.01, **ll_settings) -> BilevelProblem:
    ll_model, ul_model = Linear(5), Penalty(5)
    ll = GradientDescent(ll_objective, ll_model, ul_model, lr=lr, iters=iters, **ll_settings)
    ul = method(ul_objective, ul_model, ll_objective, ll_model)
    return BilevelProblem(ll, ul, torch.optim.SGD(ul_model.parameters(), lr=0.1))


def caught_at(call: Callable[[], object], match: str) -> tuple[str, int]:
    """``(file, line)`` that the warning matching ``match`` named, raised by ``call``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    found = [w for w in caught if match in str(w.message)]
    assert found, f"no warning matching {match!r}: {[str(w.message)[:80] for w in caught]}"
    return found[0].filename, found[0].lineno


def line_of(call: Callable[[], object]) -> tuple[str, int]:
    """Where the lambda ``call`` was written: the line a warning raised in it must name."""
    return call.__code__.co_filename, call.__code__.co_firstlineno


STEP = "step"
HYPERGRADIENT = "hypergradient"


@pytest.mark.parametrize("path", [STEP, HYPERGRADIENT])
@pytest.mark.parametrize(
    ("method", "iters", "match"),
    [(Implicit, 2, "not stationary"), (FiniteDifference, 3, "only the last of the 3")],
)
def test_method_warnings_name_the_users_line(path, method, iters, match):
    bp = problem(method, iters)
    train = val = data()
    if path == STEP:
        call = lambda: bp.step(train, val)  # noqa: E731
    else:
        call = lambda: bp.hypergradient(train, val)  # noqa: E731
    assert caught_at(call, match) == line_of(call)


def test_a_run_by_hand_names_the_users_line():
    """The same warning met without the runner: the method's own run and calculation."""
    bp = problem(Implicit, 2)
    ul, ll = bp.ul, bp.ll
    x, y = data()

    def by_hand():
        trajectory = ul.run_ll(ll, x, y)
        ul.compute_gradients(x, y, trajectory.model, x, y)  # the line named

    filename, line = caught_at(by_hand, "not stationary")
    assert (filename, line) == (__file__, by_hand.__code__.co_firstlineno + 2)


def test_a_growing_ll_names_the_users_line():
    """The LL's own warning (on_growth='warn'), under the runner."""
    bp = problem(Reverse, 20, lr=5.0, on_growth="warn")
    train = val = data()
    call = lambda: bp.step(train, val)  # noqa: E731
    assert caught_at(call, "the LL is diverging") == line_of(call)


def test_construction_warnings_name_the_users_line():
    """A constructor's warnings (a deprecated argument, Forward's cost) name its call."""
    ll_model, ul_model = Linear(5), Penalty(5)
    deprecated = lambda: GradientDescent(  # noqa: E731
        ll_objective, ll_model, ul_model, lr=0.1, iters=2, warn_on_growth=True
    )
    assert caught_at(deprecated, "warn_on_growth is deprecated") == line_of(deprecated)
    wide = Penalty(1200)
    forward = lambda: Forward(ul_objective, wide, ll_objective, Linear(1200))  # noqa: E731
    assert caught_at(forward, "1200 Jacobian-vector products") == line_of(forward)


def test_frames_of_torch_between_are_passed_over(monkeypatch):
    """A warning raised in the library under torch's ``Module.__call__`` (a patched forward)
    names the user's line that called the module. Here the forward stands for the library's
    code: this file counts as internal, and the user's line is compiled under another name."""
    import bilevel.user_warnings as user_warnings

    internal = user_warnings._internal_prefixes
    monkeypatch.setattr(user_warnings, "_internal_prefixes", lambda: (*internal(), __file__))

    class Warns(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            warn_user("from a forward", RuntimeWarning)
            return x

    users_line = compile("module(torch.zeros(1))", "<user code>", "eval")
    scope = {"module": Warns(), "torch": torch}
    assert caught_at(lambda: eval(users_line, scope), "from a forward") == ("<user code>", 1)


def test_the_outermost_frame_where_every_frame_is_internal(monkeypatch):
    """With the whole stack counted internal, the warning names the outermost frame (not an
    error, and not past the stack)."""
    import bilevel.user_warnings as user_warnings

    monkeypatch.setattr(user_warnings, "_internal_prefixes", lambda: ("",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_user("everywhere internal")
    outermost = sys._getframe()
    while outermost.f_back is not None:
        outermost = outermost.f_back
    assert caught[0].filename == outermost.f_code.co_filename


def test_iga_and_meta_sgd_warnings_name_the_users_line():
    """IGA at a converged LL; Meta-SGD's step sizes below zero (a check deep in the LL's
    schedule)."""
    bp = problem(IGA, 40, lr=0.5)
    train = val = data()
    call = lambda: bp.hypergradient(train, val)  # noqa: E731
    assert caught_at(call, "IGA at a converged LL") == line_of(call)

    net, meta = Linear(5), nn.Module()
    meta.lrs = nn.ParameterList([nn.Parameter(torch.full((5,), 0.1, dtype=DTYPE))])
    meta.log_l2 = nn.Parameter(torch.zeros(5, dtype=DTYPE))
    ll = GradientDescent(ll_objective, net, meta, lr=list(meta.lrs), iters=3)
    meta_sgd = BilevelProblem(ll, Reverse(ul_objective, meta, ll_objective, net))
    with torch.no_grad():
        meta.lrs[0][1] = -1e-3
    call = lambda: meta_sgd.hypergradient(train, val)  # noqa: E731
    assert caught_at(call, "learn their logarithm") == line_of(call)


def test_data_warnings_name_the_users_line(tmp_path):
    """The Omniglot cache's warnings, from the loader's helpers."""
    from bilevel.data import omniglot

    path = tmp_path / "cache.npz"
    path.write_bytes(b"not a zip")
    call = lambda: omniglot._load_cache(path)  # noqa: E731
    assert caught_at(call, "ignoring unreadable cache") == line_of(call)

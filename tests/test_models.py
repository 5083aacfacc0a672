"""The reference networks: shapes, batch normalization, and MAML through ``higher`` with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bilevel import BilevelProblem
from bilevel.ll import GradientDescent
from bilevel.models import MLP, ConvNet4, FewShotNet
from bilevel.ul import FirstOrder, Reverse


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions run fastest on one thread; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("hidden", [64, 32])
def test_conv_trunk_gives_hidden_features_on_28x28(hidden):
    trunk = ConvNet4(hidden=hidden)
    assert trunk.out_features == hidden
    assert trunk(torch.rand(3, 1, 28, 28)).shape == (3, hidden)
    convs = [m for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) for c in convs)


def test_conv_trunk_on_other_sizes():
    assert ConvNet4(in_channels=3, hidden=8, image_size=84).out_features == 8 * 5 * 5
    with pytest.raises(ValueError, match="image_size"):
        ConvNet4(image_size=8)
    with pytest.raises(ValueError, match="hidden"):
        ConvNet4(hidden=0)


@pytest.mark.parametrize("ways", [5, 20])
def test_few_shot_net_outputs_one_logit_per_way(ways):
    net = FewShotNet(ways, hidden=16)
    assert net(torch.rand(7, 1, 28, 28)).shape == (7, ways)
    assert net.head.in_features == 16
    with pytest.raises(ValueError, match="ways"):
        FewShotNet(0)


def test_batch_norm_uses_batch_statistics_in_train_and_eval_mode():
    """No running statistics, no buffers: evaluation is transductive, as in MAML's code."""
    net = FewShotNet(5, hidden=8)
    assert list(net.buffers()) == []
    x = torch.rand(10, 1, 28, 28)
    train_out = net(x)
    torch.testing.assert_close(net.eval()(x), train_out)
    # each example is normalized with the statistics of its batch
    assert not torch.allclose(net(x[:5]), train_out[:5])


def test_mlp_shapes():
    assert MLP(784, [32, 16], 10)(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    linear = MLP(3, [], 2)
    assert len(list(linear.parameters())) == 2
    with pytest.raises(ValueError, match="layer sizes"):
        MLP(3, [0], 2)


def _task(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(5, 1, 28, 28, generator=g, dtype=dtype)
    xq = torch.rand(10, 1, 28, 28, generator=g, dtype=dtype)
    return (xs, torch.arange(5)), (xq, torch.arange(10) % 5)


def _loss(state):
    return F.cross_entropy(state["ll_model"](state["data"]), state["target"])


def _manual_maml(net, train, val, lr, steps):
    """MAML's hypergradient written out with torch.func (no ``higher``, no bilevel)."""
    names = [n for n, _ in net.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for p in net.parameters()]

    def loss(weights, x, y):
        logits = functional_call(net, dict(zip(names, weights, strict=True)), (x,))
        return F.cross_entropy(logits, y)

    w = theta
    for _ in range(steps):
        grads = torch.autograd.grad(loss(w, *train), w, create_graph=True)
        w = [p - lr * g for p, g in zip(w, grads, strict=True)]
    val_loss = loss(w, *val)
    return w, torch.autograd.grad(val_loss, theta)


def test_maml_through_batch_norm_matches_a_hand_written_unroll():
    """Batch norm in training mode on the fast weights: the LL steps and the Reverse
    hypergradient equal a hand-written MAML in float64."""
    torch.manual_seed(0)
    net = FewShotNet(5, hidden=6).double()
    train, val = _task()
    ll = GradientDescent(_loss, net, net, lr=0.3, iters=2)
    problem = BilevelProblem(ll, Reverse(_loss, net, _loss, net))
    grads = problem.hypergradient(train, val)
    adapted, expected = _manual_maml(net, train, val, lr=0.3, steps=2)
    aux = ll.optimize(*train)
    for fast, manual in zip(aux.fast_params, adapted, strict=True):
        torch.testing.assert_close(fast, manual, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads)


def test_first_order_maml_through_batch_norm_is_the_gradient_at_the_adapted_weights():
    torch.manual_seed(0)
    net = FewShotNet(5, hidden=6).double()
    train, val = _task()
    ll = GradientDescent(_loss, net, net, lr=0.3, iters=2)
    grads = BilevelProblem(ll, FirstOrder(_loss, net, _loss, net)).hypergradient(train, val)
    adapted, _ = _manual_maml(net, train, val, lr=0.3, steps=2)
    names = [n for n, _ in net.named_parameters()]
    w = [p.detach().requires_grad_() for p in adapted]
    logits = functional_call(net, dict(zip(names, w, strict=True)), (val[0],))
    expected = torch.autograd.grad(F.cross_entropy(logits, val[1]), w)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_convolutions_before_batch_norm_carry_no_bias():
    """A bias before batch normalization has a zero gradient that Adam would amplify."""
    net = FewShotNet(5, hidden=4)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(conv.bias is None for conv in convs)

"""Deconvnet and guided backprop: hand-computed values, a manual conv/max-pool
implementation, every ReLU call form, residual nets, and the model left untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reconviz.errors import InputError
from reconviz.saliency.guided import deconvnet, guided_backprop


# --------------------------------------------------------------------------
# Linear -> ReLU -> Linear with chosen weights, computed by hand
# --------------------------------------------------------------------------


def _tiny() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 1.0], [2.0, 0.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.5, -1.0]))
        net[2].weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-1.0, 1.0, 1.0]]))
        net[2].bias.copy_(torch.tensor([0.1, -0.2]))
    return net


def test_tiny_network_by_hand():
    net = _tiny()
    x = torch.tensor([[2.0, 1.0, 1.0]])
    # z = W1 x + b1 = [2-1, 1+1+0.5, 4-1-1] = [1, 2.5, 2]       -> all active
    # use a second input where units differ:
    x2 = torch.tensor([[1.0, 2.0, -3.0]])
    # z = [1-2, 2-3+0.5, 2+3-1] = [-1, -0.5, 4]            -> only unit 2 active
    # class 0: R at hidden = W2[0] = [1, -2, 3]
    #   gradient:  D * R   = [0, 0, 3]      -> W1^T [0,0,3]  = [6, 0, -3]
    #   deconvnet: relu(R) = [1, 0, 3]      -> W1^T [1,0,3]  = [1+6, -1, -3] = [7, -1, -3]
    #   guided:    D*relu(R) = [0, 0, 3]    -> [6, 0, -3]
    # class 1: R = W2[1] = [-1, 1, 1]
    #   deconvnet: relu(R) = [0, 1, 1]      -> W1^T [0,1,1]  = [2, 1, 0]
    #   guided:    D*relu(R) = [0, 0, 1]    -> W1^T [0,0,1]  = [2, 0, -1]
    xs = torch.cat([x2, x2])
    torch.testing.assert_close(deconvnet(net, xs, [0, 1]), torch.tensor([[7.0, -1, -3], [2, 1, 0]]))
    torch.testing.assert_close(guided_backprop(net, xs, [0, 1]), torch.tensor([[6.0, 0, -3], [2, 0, -1]]))
    # all units active (x): guided = gradient masked by the sign of R = [1, -2, 3]
    #   deconvnet = guided = W1^T [1, 0, 3] = [7, -1, -3]; gradient = W1^T [1,-2,3] = [7, -3, -5]
    torch.testing.assert_close(deconvnet(net, x, 0), torch.tensor([[7.0, -1, -3]]))
    torch.testing.assert_close(guided_backprop(net, x, 0), torch.tensor([[7.0, -1, -3]]))


def test_target_forms_agree():
    net = _tiny()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    a = guided_backprop(net, x, 1)
    b = guided_backprop(net, x, [1, 1, 1, 1])
    c = guided_backprop(net, x, torch.tensor([1, 1, 1, 1]))
    d = guided_backprop(net, x, lambda out: out[:, 1])
    for other in (b, c, d):
        torch.testing.assert_close(a, other)
    assert a.shape == x.shape and a.dtype == x.dtype
    with pytest.raises(InputError):
        guided_backprop(net, x, [0, 1])
    with pytest.raises(InputError):
        deconvnet(net, x, 5)


def test_leaky_and_relu6_rules():
    """LeakyReLU: rho = leaky on the backward signal; ReLU6: rectifier, upper clip is a forward mask."""
    w1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w2 = torch.tensor([[-1.0, 2.0]])
    for act, x, deconv, guided in [
        # z = x = [-1, 3]; R = [-1, 2]; leaky a=0.1: D = [0.1, 1]
        (nn.LeakyReLU(0.1), [[-1.0, 3.0]], [[-0.1, 2.0]], [[-0.01, 2.0]]),
        # ReLU6, z = [2, 7]: D = [1, 0] (7 is clipped); R = [-1, 2]
        (nn.ReLU6(), [[2.0, 7.0]], [[0.0, 2.0]], [[0.0, 0.0]]),
        # Hardtanh(-1, 1) is not a rectifier: ordinary backward D * R; z = [0.5, 3] -> D = [1, 0]
        (nn.Hardtanh(-1.0, 1.0), [[0.5, 3.0]], [[-1.0, 0.0]], [[-1.0, 0.0]]),
        # Threshold(0.5, 0): a shifted ReLU; z = [1, 0.2] -> D = [1, 0]
        (nn.Threshold(0.5, 0.0), [[1.0, 0.2]], [[0.0, 2.0]], [[0.0, 0.0]]),
    ]:
        net = nn.Sequential(nn.Linear(2, 2, bias=False), act, nn.Linear(2, 1, bias=False)).eval()
        with torch.no_grad():
            net[0].weight.copy_(w1)
            net[2].weight.copy_(w2)
        xt = torch.tensor(x)
        torch.testing.assert_close(deconvnet(net, xt, 0), torch.tensor(deconv), msg=str(act))
        torch.testing.assert_close(guided_backprop(net, xt, 0), torch.tensor(guided), msg=str(act))


# --------------------------------------------------------------------------
# conv + max-pool against an explicit implementation
# --------------------------------------------------------------------------


class ConvPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2, stride=1, padding=0)  # 4x4 -> 3x3
        return self.fc(x.flatten(1))


def _manual(net: ConvPool, x: torch.Tensor, c: int, method: str) -> torch.Tensor:
    """The deconvnet / guided backprop written out: transposed convs and max-unpooling."""
    x = x.double()
    net = copy.deepcopy(net).double()
    z1 = net.conv(x)
    p1, i1 = F.max_pool2d(F.relu(z1), 2, return_indices=True)
    z2 = net.conv2(p1)
    p2, i2 = F.max_pool2d(F.relu(z2), 2, stride=1, return_indices=True)

    def unpool(r, idx, z):  # max-unpooling that sums where windows overlap and share a switch
        out = torch.zeros_like(z).flatten(-2)
        return out.scatter_add_(-1, idx.flatten(-2), r.flatten(-2)).view_as(z)

    def rect(r, z):
        return F.relu(r) if method == "deconvnet" else (z > 0) * F.relu(r)

    r = net.fc.weight[c].reshape(1, *p2.shape[1:]).expand_as(p2)
    r = unpool(r, i2, z2)
    r = F.conv_transpose2d(rect(r, z2), net.conv2.weight, padding=1)
    r = unpool(r, i1, z1)
    return F.conv_transpose2d(rect(r, z1), net.conv.weight, padding=1)


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_conv_maxpool_matches_manual(method):
    torch.manual_seed(0)
    net = ConvPool().eval()
    x = torch.randn(3, 2, 8, 8)
    fn = deconvnet if method == "deconvnet" else guided_backprop
    got = fn(net, x, [0, 2, 4], dtype=torch.float64)
    want = torch.cat([_manual(net, x[i : i + 1], c, method) for i, c in enumerate([0, 2, 4])])
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-7)
    # they differ from the gradient (and from each other) on a random net
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(net(xg)[:, 0].sum(), xg)[0]
    assert not torch.allclose(got, grad, atol=1e-4)


# --------------------------------------------------------------------------
# every ReLU call form, residual nets
# --------------------------------------------------------------------------


class Forms(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def relu(self, t):
        if self.form == "module":
            return self.act(t)  # nn.ReLU(inplace=True)
        if self.form == "functional":
            return F.relu(t)
        if self.form == "torch_inplace":
            return torch.relu_(t)
        if self.form == "method":
            return t.relu()
        if self.form == "method_inplace":
            t.relu_()  # return value ignored: the in-place result must carry the rule
            return t
        raise ValueError(self.form)

    def forward(self, x):
        y = self.relu(self.c1(x))
        y = y + self.relu(self.c2(y))  # residual
        return self.fc(F.max_pool2d(y, 2, stride=1).flatten(1))


def _reference(model: nn.Module, x: torch.Tensor, c: int, method: str) -> torch.Tensor:
    """The same rules with backward hooks on an out-of-place copy (the classic implementation)."""
    ref = Forms("functional")
    ref.load_state_dict(model.state_dict())
    ref = ref.double().eval()

    class Rule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return z.clamp_min(0)

        @staticmethod
        def backward(ctx, g):
            (z,) = ctx.saved_tensors
            return F.relu(g) if method == "deconvnet" else (z > 0) * F.relu(g)

    ref.relu = Rule.apply  # type: ignore[method-assign]
    xg = x.double().clone().requires_grad_(True)
    return torch.autograd.grad(ref(xg)[:, c].sum(), xg)[0]


@pytest.mark.parametrize("form", ["module", "functional", "torch_inplace", "method", "method_inplace"])
def test_every_relu_form_and_residual(form, untouched):
    torch.manual_seed(1)
    net = Forms(form).eval()
    x = torch.randn(2, 1, 7, 7)
    with untouched(net):
        for method, fn in (("deconvnet", deconvnet), ("guided", guided_backprop)):
            got = fn(net, x, 1)
            torch.testing.assert_close(got.double(), _reference(net, x, 1, method), rtol=1e-6, atol=1e-9)


class InputInplace(nn.Module):
    """Rectifies its own input in place, then a slice of a hidden layer in place."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        x.relu_()
        h = self.fc1(x)
        h[:, :3].relu_()  # in place on a view
        return self.fc2(h)


def test_inplace_on_input_and_on_a_view():
    torch.manual_seed(3)
    net = InputInplace().eval()
    x = torch.randn(3, 4)
    x0 = x.clone()
    got = deconvnet(net, x, 1, dtype=torch.float64)
    assert torch.equal(x, x0)  # the caller's tensor is not written to
    # by hand: R = fc2.weight[1]; rectify units 0..2 (deconvnet: relu of the signal), pass 3..5
    w1, w2 = net.fc1.weight.double(), net.fc2.weight.double()
    r = w2[1].expand(3, 6).clone()
    r[:, :3] = r[:, :3].clamp_min(0)
    want = (r @ w1).clamp_min(0)  # the input's own ReLU, deconvnet rule
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["resnet", "densenet"])
def test_residual_and_concatenating_architectures(name, untouched):
    from archs import classic

    net = classic(name, classes=4)
    x = torch.randn(2, *net.input_shape, generator=torch.Generator().manual_seed(2))
    with untouched(net):
        g = guided_backprop(net, x, [0, 3])
        d = deconvnet(net, x, [0, 3])
    assert g.shape == d.shape == x.shape
    assert torch.isfinite(g).all() and g.abs().sum() > 0 and d.abs().sum() > 0
    # guided backprop is sparser than the deconvnet: it also keeps the forward masks
    assert (g != 0).sum() <= (d != 0).sum()


# --------------------------------------------------------------------------
# the user's model: untouched, also after an error
# --------------------------------------------------------------------------


def test_model_untouched_training_flag_and_hooks(untouched):
    net = _tiny().train()
    net[1].register_forward_hook(lambda *a: None)
    x = torch.randn(2, 3)
    with untouched(net), pytest.warns(Warning):
        guided_backprop(net, x, 0)
    assert net.training and all(p.requires_grad for p in net.parameters())


def test_model_untouched_after_error(untouched):
    net = _tiny()
    with untouched(net):
        with pytest.raises(RuntimeError):
            deconvnet(net, torch.randn(2, 4), 0)  # wrong input width
        with pytest.raises(InputError):
            guided_backprop(net, torch.randn(2, 3), 7)  # bad target
    # still works afterwards, and the modes left nothing active
    assert deconvnet(net, torch.randn(1, 3), 0).shape == (1, 3)
    assert torch.relu(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]

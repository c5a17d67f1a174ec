"""Small versions of classic architectures, and a generator of random
piecewise-linear networks, for the tests (torchvision is not used)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _init_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics and affine params."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class LeNet(nn.Module):
    """LeNet-5 shape (ReLU + max-pool) for 1x28x28 inputs."""

    input_shape = (1, 28, 28)

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class AlexNetish(nn.Module):
    """AlexNet-style: large strided first conv, overlapping 3/2 max-pools, in-place ReLUs,
    adaptive average pooling, dropout, three FC layers. Input 3x64x64."""

    input_shape = (3, 64, 64)

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(16, 24, 5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(32 * 4, 64), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Linear(32, classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGGish(nn.Module):
    """VGG-style blocks of conv-BN-ReLU x2 + max-pool. Input 3x32x32."""

    input_shape = (3, 32, 32)

    def __init__(self, classes: int = 10, widths=(8, 16, 24)):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * (32 >> len(widths)) ** 2, classes)
        _init_bn(self, 1)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.down is None else self.down(x)  # in-place residual add
        return out.relu_()


class ResNetish(nn.Module):
    """ResNet basic-block net: stem conv + max-pool, 3 stages, global average pool."""

    input_shape = (3, 32, 32)

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, 2)
        self.layer3 = BasicBlock(16, 24, 2)
        self.fc = nn.Linear(24, classes)
        _init_bn(self, 2)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], dim=1)


class DenseNetish(nn.Module):
    """DenseNet-style: concatenating dense layers, BN-ReLU-conv, transition with avg-pool."""

    input_shape = (3, 16, 16)

    def __init__(self, classes: int = 10, growth: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        c = 8
        blocks = []
        for _ in range(3):
            blocks.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*blocks)
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2))
        c //= 2
        self.block2 = nn.Sequential(DenseLayer(c, growth), DenseLayer(c + growth, growth))
        c += 2 * growth
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)
        _init_bn(self, 3)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        x = F.relu(self.norm(x), inplace=True)
        return self.fc(F.adaptive_max_pool2d(x, 1).flatten(1))


CLASSIC = {"lenet": LeNet, "alexnet": AlexNetish, "vgg": VGGish, "resnet": ResNetish, "densenet": DenseNetish}


def classic(name: str, seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return CLASSIC[name](classes=classes).eval()


# --------------------------------------------------------------------------
# Random piecewise-linear architectures (for hypothesis)
# --------------------------------------------------------------------------


class Fn(nn.Module):
    """A module that applies a function: puts functional calls inside a named module."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _prelu(c: int) -> nn.Module:
    m = nn.PReLU(c)
    m.weight.data = torch.linspace(0.05, 0.4, c)
    return m


ACTIVATIONS = {
    "relu_module": lambda c: nn.ReLU(),
    "relu_inplace": lambda c: nn.ReLU(inplace=True),
    "relu_functional": lambda c: Fn(F.relu),
    "relu_torch_inplace": lambda c: Fn(torch.relu_),
    "relu_method": lambda c: Fn(lambda t: t.relu()),
    "relu6": lambda c: nn.ReLU6(),
    "hardtanh": lambda c: nn.Hardtanh(-0.5, 0.7),
    "leaky": lambda c: nn.LeakyReLU(0.1),
    "leaky_inplace": lambda c: nn.LeakyReLU(0.2, inplace=True),
    "prelu": _prelu,
    "clamp_min": lambda c: Fn(lambda t: t.clamp(min=0.05)),
    "threshold": lambda c: nn.Threshold(0.1, -0.2),
}


class _Branch(nn.Module):
    """Residual (y + skip(x)) or concatenating ([x, y]) branch around conv + activation."""

    def __init__(self, kind, conv, cin, cout, act):
        super().__init__()
        self.kind = kind
        self.conv = conv(cin, cout, 3, 1, 1)
        self.act = ACTIVATIONS[act](cout)
        self.skip = conv(cin, cout, 1) if kind == "res" and cin != cout else None

    def forward(self, x):
        y = self.act(self.conv(x))
        if self.kind == "cat":
            return torch.cat([x, y], dim=1)
        return y + (x if self.skip is None else self.skip(x))


class PoolUp(nn.Module):
    """A pooling of one dimension more, over (channels, *spatial): (N, C, *S) is pooled as
    (N, 1, C, *S), so 1-d nets get MaxPool2d / AdaptiveMaxPool2d across channels and 2-d nets
    get MaxPool3d / AdaptiveMaxPool3d."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return self.pool(x.unsqueeze(1)).squeeze(1)


def _stage(spec_stage, dims: int, c: int) -> tuple[nn.Module, int]:
    """One stage from its spec; returns (module, output channels)."""
    kind = spec_stage[0]
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    if kind == "pool_up":  # ("pool_up", "max" | "adaptive_max", (k, s, p, ceil, dil))
        _, pool, (k, s, p, ceil, dil) = spec_stage
        d = f"{dims + 1}d"
        if pool == "max":
            return PoolUp(getattr(nn, "MaxPool" + d)(k, s, p, dilation=dil, ceil_mode=ceil)), -1
        return PoolUp(getattr(nn, "AdaptiveMaxPool" + d)(k)), -1
    if kind == "conv":
        _, out, k, s, p = spec_stage
        return conv(c, out, k, s, p), out
    if kind == "bn":
        return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c), c
    if kind == "act":
        return ACTIVATIONS[spec_stage[1]](c), c
    if kind in ("res", "cat"):
        _, out, act = spec_stage
        return _Branch(kind, conv, c, out, act), (out if kind == "res" else c + out)
    _, pool, (k, s, p, ceil, dil) = spec_stage  # pooling
    d = "1d" if dims == 1 else "2d"
    if pool == "max":
        return getattr(nn, "MaxPool" + d)(k, s, p, dilation=dil, ceil_mode=ceil), c
    if pool == "avg":
        return getattr(nn, "AvgPool" + d)(k, s, p, ceil_mode=ceil), c
    return getattr(nn, ("AdaptiveMaxPool" if pool == "adaptive_max" else "AdaptiveAvgPool") + d)(k), c


class RandomNet(nn.Module):
    """A network from a spec {dims, channels, size, classes, stages}; stages that do
    not fit the running shape are dropped (decided by a dry run), so any spec builds."""

    def __init__(self, spec: dict):
        super().__init__()
        dims, c = spec["dims"], spec["channels"]
        x = torch.zeros(1, c, *([spec["size"]] * dims))
        self.stages = nn.ModuleList()
        self.kept = []
        for st in spec["stages"]:
            try:
                module, _ = _stage(st, dims, c)
                y = module.eval()(x)
            except (RuntimeError, ValueError):
                continue
            if y.numel() == 0 or min(y.shape[2:]) < 1 or not torch.isfinite(y).all():
                continue  # e.g. a max-pool window entirely in the padding: -inf
            self.stages.append(module)
            self.kept.append(st)
            x, c = y, y.shape[1]  # pool_up changes the channel count
        self.head = nn.Linear(x[0].numel(), spec["classes"])
        _init_bn(self, 7)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.head(x.flatten(1))


# --------------------------------------------------------------------------
# Gated blocks (issue 12, the value rule): small versions of modern classifiers' blocks
# --------------------------------------------------------------------------


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial affine weights for LayerNorm / GroupNorm (and BatchNorm statistics)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return _init_bn(model, seed)


class SqueezeExcite(nn.Module):
    """x * gate(fc2(act(fc1(mean x)))): the scale multiplies the input-dependent x."""

    def __init__(self, c: int, hidden: int, act: nn.Module, gate: nn.Module):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)
        self.act, self.gate = act, gate

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    """Conv stem, then an inverted residual: 1x1 expand, act, depthwise 3x3, act,
    squeeze-excitation (``se_act`` inside, ``gate`` scale), 1x1 project, residual; then a
    linear head. Input 3x8x8."""

    input_shape = (3, 8, 8)

    def __init__(self, act, se_act, gate, wide: int, stem_act: nn.Module, seed: int, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), stem_act)
        self.expand = nn.Sequential(nn.Conv2d(8, wide, 1), nn.BatchNorm2d(wide), act())
        self.depthwise = nn.Sequential(nn.Conv2d(wide, wide, 3, padding=1, groups=wide), nn.BatchNorm2d(wide), act())
        self.se = SqueezeExcite(wide, wide // 4, se_act, gate)
        self.project = nn.Sequential(nn.Conv2d(wide, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, classes)
        _init_bn(self, seed)

    def forward(self, x):
        z = self.stem(x)
        z = z + self.project(self.se(self.depthwise(self.expand(z))))
        return self.head(F.adaptive_avg_pool2d(z, 1).flatten(1))


def MobileNetV3Block() -> InvertedResidual:
    """MobileNetV3: hardswish, ReLU inside a hardsigmoid squeeze-excitation."""
    return InvertedResidual(nn.Hardswish, nn.ReLU(), nn.Hardsigmoid(), 16, nn.Identity(), seed=1)


def MBConvBlock() -> InvertedResidual:
    """EfficientNet MBConv: SiLU everywhere (the stem too), a sigmoid squeeze-excitation."""
    return InvertedResidual(nn.SiLU, nn.SiLU(), nn.Sigmoid(), 24, nn.SiLU(), seed=2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, LayerNorm over channels (permute to channels-last), 4x MLP with
    GELU, layer scale, residual; patchify stem and a LayerNorm + linear head. Input 3x8x8."""

    input_shape = (3, 8, 8)

    def __init__(self, classes: int = 4, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.head_norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, classes)
        _randomize_norms(self, 3)

    def forward(self, x):
        z = self.stem(x)
        y = self.dwconv(z).permute(0, 2, 3, 1)  # (N, H, W, C)
        y = self.gamma * self.mlp(self.norm(y))
        z = z + y.permute(0, 3, 1, 2)
        return self.head(self.head_norm(z.mean((2, 3))))


class TinyViT(nn.Module):
    """A ViT encoder: patch embedding by conv, class token, position embedding, pre-norm blocks
    of nn.MultiheadAttention (eval) and a GELU MLP, final LayerNorm on the class token.
    Input 3x8x8 (four 4x4 patches)."""

    input_shape = (3, 8, 8)

    def __init__(self, classes: int = 4, d: int = 8, heads: int = 2, depth: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d, generator=g) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 5, d, generator=g) * 0.5)
        self.blocks = nn.ModuleList(ViTLayer(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        _randomize_norms(self, 4)

    def forward(self, x):
        z = self.patch(x).flatten(2).transpose(1, 2)  # (N, 4, d)
        z = torch.cat([self.cls.expand(z.shape[0], -1, -1), z], dim=1) + self.pos
        for block in self.blocks:
            z = block(z)
        return self.head(self.norm(z[:, 0]))


class ViTLayer(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, z):
        h = self.norm1(z)
        z = z + self.attn(h, h, h)[0]
        return z + self.mlp(self.norm2(z))


class SwinBlock(nn.Module):
    """Swin: patch embedding, LayerNorm, window attention (2x2 windows of a 4x4 token grid,
    shifted by one with the constant shifted-window mask) with a learned relative position bias
    gathered by a constant index, a GELU MLP, residuals; mean-pooled LayerNorm + linear head.
    Attention written by hand: softmax(q k^T s + bias + mask) v. Input 3x8x8."""

    input_shape = (3, 8, 8)
    detach_attention = False

    def __init__(self, classes: int = 4, d: int = 8, heads: int = 2, window: int = 2, shift: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.d, self.heads, self.window, self.shift = d, heads, window, shift
        self.patch = nn.Conv2d(3, d, 2, stride=2)  # (N, d, 4, 4)
        self.norm1, self.norm2, self.head_norm = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads, generator=g) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1])  # (w*w, w*w)
        self.register_buffer("mask", self._shift_mask(4, window, shift))
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes)
        _randomize_norms(self, 5)

    @staticmethod
    def _shift_mask(size: int, w: int, shift: int) -> torch.Tensor:
        region = torch.zeros(size, size)
        cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
        for k, (a, b) in enumerate((a, b) for a in cuts for b in cuts):
            region[a, b] = k
        win = region.reshape(size // w, w, size // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        return (win[:, :, None] != win[:, None, :]).float() * -100.0  # (windows, w*w, w*w)

    def _windows(self, z):  # (N, H, W, d) -> (N * windows, w*w, d)
        n, h, w_, d = z.shape
        w = self.window
        return z.reshape(n, h // w, w, w_ // w, w, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, d)

    def _merge(self, z, n, h):  # inverse of _windows
        w = self.window
        return z.reshape(n, h // w, h // w, w, w, self.d).permute(0, 1, 3, 2, 4, 5).reshape(n, h, h, self.d)

    def forward(self, x):
        z = self.patch(x).permute(0, 2, 3, 1)  # (N, 4, 4, d)
        n, h = z.shape[0], z.shape[1]
        y = torch.roll(self.norm1(z), (-self.shift, -self.shift), (1, 2))
        win = self._windows(y)  # (N*4, 4, d)
        q, k, v = self.qkv(win).reshape(win.shape[0], -1, 3, self.heads, self.d // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index.reshape(-1)].reshape(self.index.shape + (self.heads,)).permute(2, 0, 1)
        scores = q @ k.transpose(-2, -1) * (self.d // self.heads) ** -0.5 + bias
        windows = self.mask.shape[0]
        scores = scores.reshape(n, windows, self.heads, *scores.shape[-2:]) + self.mask[None, :, None]
        a = torch.softmax(scores, -1).reshape(-1, self.heads, *scores.shape[-2:])
        a = a.detach() if self.detach_attention else a  # the value rule's oracle (tests/ops/test_gated.py)
        out = (a @ v).transpose(1, 2).reshape(win.shape[0], -1, self.d)
        y = torch.roll(self._merge(self.proj(out), n, h), (self.shift, self.shift), (1, 2))
        z = z + y
        z = z + self.mlp(self.norm2(z))
        return self.head(self.head_norm(z.mean((1, 2))))


GATED_BLOCKS = {"mobilenetv3": MobileNetV3Block, "mbconv": MBConvBlock, "convnext": ConvNeXtBlock, "vit": TinyViT,
                "swin": SwinBlock}


# --------------------------------------------------------------------------
# Random gated architectures (for hypothesis): tokens (N, T, D), the value rule's ops
# --------------------------------------------------------------------------

_PHI = {"sigmoid": (torch.sigmoid, 0.25), "tanh": (torch.tanh, 1.0), "softplus": (F.softplus, 0.5),
        "elu": (F.elu, 1.0)}
_SELF_GATED = {
    "silu": (F.silu, torch.sigmoid), "gelu": (F.gelu, lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))),
    "gelu_tanh": (lambda z: F.gelu(z, approximate="tanh"),
                  lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))),
    "hardswish": (F.hardswish, lambda z: F.relu6(z + 3) / 6), "mish": (F.mish, lambda z: torch.tanh(F.softplus(z))),
}
GATED_ACTS = sorted(_PHI) + sorted(_SELF_GATED) + ["relu", "leaky_relu"]


class GatedStage(nn.Module):
    """One stage of :class:`RandomGatedNet` on (N, T, D); ``oracle``: the value rule written by
    hand (its frozen factors detached), for the test's oracle."""

    def __init__(self, spec: tuple, d: int):
        super().__init__()
        self.spec, self.oracle = spec, False
        kind = spec[0]
        if kind in ("linear", "res", "se", "attn"):
            self.fc = nn.Linear(d, d)
        if kind in ("res", "attn"):
            self.fc2, self.fc3 = nn.Linear(d, d), nn.Linear(d, d)
        if kind == "norm" and spec[1] in ("layer", "rms"):
            self.norm = nn.LayerNorm(d) if spec[1] == "layer" else nn.RMSNorm(d, eps=1e-6)

    def _act(self, z, name):
        if name == "relu":
            return F.relu(z)
        if name == "leaky_relu":
            return F.leaky_relu(z, 0.1)
        if name in _SELF_GATED:
            f, g = _SELF_GATED[name]
            return z * g(z).detach() if self.oracle else f(z)
        phi, d0 = _PHI[name]
        if not self.oracle:
            return phi(z)
        at0 = phi(torch.zeros_like(z))
        s = torch.where(z == 0, torch.full_like(z, d0), (phi(z) - at0) / torch.where(z == 0, torch.ones_like(z), z))
        return at0 + s.detach() * z

    def _frozen(self, t):
        return t.detach() if self.oracle else t

    def forward(self, z):
        kind, o = self.spec[0], self._frozen
        if kind == "linear":
            return self.fc(z)
        if kind == "act":
            return self._act(z, self.spec[1])
        if kind == "res":
            return z + self.fc2(self._act(self.fc(z), self.spec[1]))
        if kind == "se":  # z * gate(fc(mean over tokens))
            s = self.fc(z.mean(1, keepdim=True))
            gate = torch.sigmoid(s) if self.spec[1] == "sigmoid" else F.hardsigmoid(s)
            return z * o(gate)
        if kind == "attn":
            q, k, v = self.fc(z), self.fc2(z), self.fc3(z)
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(z.shape[-1]), -1)
            return z + o(a) @ v
        c = z - z.mean(-1, keepdim=True)  # norms
        if self.spec[1] == "layer":
            if not self.oracle:
                return self.norm(z)
            return c * o(torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + self.norm.eps)) * self.norm.weight \
                + self.norm.bias
        if self.spec[1] == "rms":
            return z * o(torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)) * self.norm.weight if self.oracle \
                else self.norm(z)
        if self.spec[1] == "normalize":
            return z / o(z.norm(dim=-1, keepdim=True).clamp_min(1e-12)) if self.oracle else F.normalize(z, dim=-1)
        return c / o(torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5))  # "by hand"


class RandomGatedNet(nn.Module):
    """(N, T, D) -> linear -> stages -> flatten -> linear to ``classes``. ``spec``: tokens,
    width, classes, stages (kind, option)."""

    def __init__(self, spec: dict):
        super().__init__()
        t, d = spec["tokens"], spec["width"]
        self.input_shape = (t, d)
        self.inp = nn.Linear(d, d)
        self.stages = nn.ModuleList(GatedStage(s, d) for s in spec["stages"])
        self.head = nn.Linear(t * d, spec["classes"])
        _randomize_norms(self, 6)

    def as_oracle(self) -> "RandomGatedNet":
        """A copy whose stages run the value rule by hand (frozen factors detached)."""
        import copy

        oracle = copy.deepcopy(self)
        for s in oracle.stages:
            s.oracle = True
        return oracle

    def forward(self, x):
        z = self.inp(x)
        for stage in self.stages:
            z = stage(z)
        return self.head(z.flatten(1))

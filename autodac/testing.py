"""Tiny models and layer configurations for tests: small enough to run in milliseconds on one core.

Nothing here is needed at run time; the test suite (and anyone testing a new factorisation)
imports it. Every model takes a ``seed`` so two calls give the same weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "SmallConvNet", "TinyViT", "SwinLikeNet", "Conv1dNet", "LinearHeadNet", "GroupedConvNet", "DepthwiseOnlyNet", "SharedConvNet",
    "InvertedResidualNet", "TwoInputNet", "DenseNetLike", "InceptionLike", "ConvNeXtLike", "ShuffleNetLike",
    "TinyResNet", "tiny_resnet18", "tiny_resnet34",
    "LayerConfig", "conv_configs", "linear_configs", "method_cases", "seeded",
]


def seeded(model: nn.Module, seed: int) -> nn.Module:
    """``model`` re-initialised from ``seed`` (in place; returned), without touching the global RNG.

    Conv/Linear layers get torch's default initialisation; BatchNorms get non-trivial affine
    parameters and running statistics, so folding or ignoring them would show in a test.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.weight.copy_(1.0 + 0.2 * torch.randn_like(module.weight))
                    module.bias.copy_(0.1 * torch.randn_like(module.bias))
                    module.running_mean.copy_(0.1 * torch.randn_like(module.running_mean))
                    module.running_var.copy_(0.5 + torch.rand_like(module.running_var))
                elif hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                elif hasattr(module, "_reset_parameters"):  # nn.MultiheadAttention
                    module._reset_parameters()
    return model


class SmallConvNet(nn.Module):
    """3x3 conv-BN, strided 3x3 conv-BN, 1x1 conv with bias, pooled into a Linear head; input ``N x 3 x H x W``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 project -> BN (+ input)."""

    def __init__(self, channels_in: int, channels_out: int, expand: int, stride: int, functional: bool) -> None:
        super().__init__()
        hidden = channels_in * expand
        self.expand = nn.Conv2d(channels_in, hidden, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, channels_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.act = nn.ReLU6()
        self.functional = functional
        self.residual = stride == 1 and channels_in == channels_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = (lambda t: torch.nn.functional.relu6(t)) if self.functional else self.act
        y = act(self.bn0(self.expand(x)))
        y = act(self.bn1(self.depthwise(y)))
        y = self.bn2(self.project(y))
        return x + y if self.residual else y


class InvertedResidualNet(nn.Module):
    """A small MobileNetV2: stem, three inverted-residual blocks (one with a residual), 1x1 head, Linear classifier.

    ``functional=True`` applies the blocks' activations as ``F.relu6`` calls instead of modules.
    Input ``N x 3 x H x W``.
    """

    def __init__(self, seed: int = 0, functional: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(
            _InvertedResidual(16, 24, 4, 2, functional),
            _InvertedResidual(24, 24, 6, 1, functional),
            _InvertedResidual(24, 32, 6, 2, functional),
        )
        self.head = nn.Conv2d(32, 96, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(96)
        self.classifier = nn.Linear(96, num_classes)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu6(self.bn(self.stem(x)))
        x = self.blocks(x)
        x = torch.nn.functional.relu6(self.head_bn(self.head(x)))
        return self.classifier(x.mean((2, 3)))


class Conv1dNet(nn.Module):
    """Two Conv1d layers (one with ``padding='same'``) with BN, and a Linear head; input ``N x 4 x L``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 12, 5, padding="same")
        self.bn1 = nn.BatchNorm1d(12)
        self.conv2 = nn.Conv1d(12, 12, 3, stride=2, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(12, 3)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(2))


class LinearHeadNet(nn.Module):
    """A 3x3 conv followed by a wide two-layer Linear head, so most FLOPs sit in ``nn.Linear``; input ``N x 2 x 6 x 6``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 6 * 6, 64)
        self.fc2 = nn.Linear(64, 10, bias=False)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class GroupedConvNet(nn.Module):
    """A plain 3x3 conv, a grouped conv (groups=2) and a depthwise conv; input ``N x 4 x H x W``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(torch.relu(self.grouped(torch.relu(self.conv(x)))))


class DepthwiseOnlyNet(nn.Module):
    """Only a depthwise conv and a BN: nothing autodac can decompose; input ``N x 4 x H x W``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(4)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.depthwise(x))


class SharedConvNet(nn.Module):
    """One 3x3 conv applied twice (the same module runs two times per forward); input ``N x 6 x H x W``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


class TwoInputNet(nn.Module):
    """Two inputs, ``model(image, extra)``: an ``N x 3 x H x W`` image branch and an ``N x 1 x H x W`` one
    (say depth), each conv-BN-ReLU, concatenated, fused by a 3x3 conv-BN, pooled into a Linear head."""

    def __init__(self, seed: int = 0, classes: int = 5) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.extra = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(20, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Linear(24, classes)
        seeded(self, seed)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat([self.image(image), self.extra(extra)], 1))
        return self.head(self.mix(x).mean((2, 3)))


def _conv_bn(channels_in: int, channels_out: int, kernel: int | tuple[int, int] = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU, padded to keep the map (over ``stride``)."""
    pad = tuple(k // 2 for k in kernel) if isinstance(kernel, tuple) else kernel // 2
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(channels_out), nn.ReLU()
    )


class _DenseLayer(nn.Module):
    """DenseNet's layer: BN-ReLU-1x1 (bottleneck) -> BN-ReLU-3x3 (growth), concatenated to its input."""

    def __init__(self, channels_in: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(channels_in), nn.Conv2d(channels_in, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(torch.relu(self.norm2(y)))], 1)


class DenseNetLike(nn.Module):
    """A small DenseNet: stem, a dense block of three layers (each concatenates), a transition
    (BN-ReLU-1x1, average pool), a second dense block, pooled Linear head. Input ``N x 3 x H x W``."""

    def __init__(self, seed: int = 0, growth: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3)
        self.block1 = nn.Sequential(*(_DenseLayer(16 + i * growth, growth) for i in range(3)))
        width = 16 + 3 * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width // 2, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(*(_DenseLayer(width // 2 + i * growth, growth) for i in range(2)))
        self.norm = nn.BatchNorm2d(width // 2 + 2 * growth)
        self.classifier = nn.Linear(width // 2 + 2 * growth, num_classes)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        return self.classifier(torch.relu(self.norm(x)).mean((2, 3)))


class _InceptionBlock(nn.Module):
    """GoogLeNet's block: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | 3x3 max-pool -> 1x1, concatenated."""

    def __init__(self, channels_in: int, width: int) -> None:
        super().__init__()
        self.branch1 = _conv_bn(channels_in, width)
        self.branch3 = nn.Sequential(_conv_bn(channels_in, width // 2), _conv_bn(width // 2, width, 3))
        self.branch5 = nn.Sequential(_conv_bn(channels_in, width // 4), _conv_bn(width // 4, width // 2, 3), _conv_bn(width // 2, width // 2, 3))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(channels_in, width // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.pool(x)], 1)


class InceptionLike(nn.Module):
    """A small Inception net: stem with an asymmetric 1x7 / 7x1 pair, two inception blocks, Linear head.
    Input ``N x 3 x H x W``."""

    def __init__(self, seed: int = 0, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 16, 3, stride=2), _conv_bn(16, 16, (1, 7)), _conv_bn(16, 24, (7, 1)))
        self.block1 = _InceptionBlock(24, 16)
        self.block2 = _InceptionBlock(48, 24)
        self.fc = nn.Linear(72, num_classes)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(torch.nn.functional.max_pool2d(self.block1(self.stem(x)), 2))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: 7x7 depthwise -> LayerNorm (channels last) -> Linear 4x -> GELU -> Linear -> layer scale, plus input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(channels, 4 * channels), nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(torch.nn.functional.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """A small ConvNeXt: 4x4 stride-4 stem with LayerNorm, two blocks, a 2x2 stride-2 downsampling conv,
    two more blocks, LayerNorm and Linear head. Input ``N x 3 x H x W`` (H, W multiples of 8)."""

    def __init__(self, seed: int = 0, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 4, stride=4)
        self.stem_norm = nn.GroupNorm(1, 24)
        self.stage1 = nn.Sequential(_ConvNeXtBlock(24), _ConvNeXtBlock(24))
        self.down = nn.Conv2d(24, 48, 2, stride=2)
        self.stage2 = nn.Sequential(_ConvNeXtBlock(48), _ConvNeXtBlock(48))
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, num_classes)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem_norm(self.stem(x)))))
        return self.head(self.norm(x.mean((2, 3))))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle: channels regrouped so that each group takes one from every other."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ShuffleBlock(nn.Module):
    """ShuffleNetV2's unit: half the channels pass, the other half go 1x1 -> 3x3 depthwise -> 1x1; concatenated and shuffled."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _conv_bn(half, half), nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half), _conv_bn(half, half)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, change = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(change)], 1), 2)


class ShuffleNetLike(nn.Module):
    """A small ShuffleNetV2: stem, a grouped 1x1 (groups=2), two shuffle units, 1x1 conv, Linear head. Input ``N x 3 x H x W``."""

    def __init__(self, seed: int = 0, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 24, 3, stride=2)
        self.grouped = _conv_bn(24, 32, 1, groups=2)
        self.units = nn.Sequential(_ShuffleBlock(32), _ShuffleBlock(32))
        self.conv_last = _conv_bn(32, 64)
        self.fc = nn.Linear(64, num_classes)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv_last(self.units(self.grouped(self.stem(x)))).mean((2, 3)))


def _conv3d_bn(cin: int, cout: int, kernel: int | tuple[int, int, int], stride: int | tuple[int, int, int] = 1) -> nn.Sequential:
    kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, stride=stride, padding=tuple(k // 2 for k in kernel), bias=False), nn.BatchNorm3d(cout), nn.ReLU()
    )


class VideoNet(nn.Module):
    """A small video net, (2+1)-D style: a 3-D stem, a spatial ``1x3x3`` then a temporal ``3x1x1`` conv, a ``1x1x1``
    bottleneck before a ``3x3x3`` conv with a residual, a Linear head. Input ``N x 3 x T x H x W``."""

    def __init__(self, seed: int = 0, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv3d_bn(3, 16, (3, 5, 5), stride=(1, 2, 2))
        self.spatial = _conv3d_bn(16, 24, (1, 3, 3))
        self.temporal = _conv3d_bn(24, 24, (3, 1, 1))
        self.reduce = _conv3d_bn(24, 12, 1)
        self.conv = _conv3d_bn(12, 24, 3)
        self.fc = nn.Linear(24, num_classes)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.temporal(self.spatial(self.stem(x)))
        x = x + self.conv(self.reduce(x))
        return self.fc(x.mean((2, 3, 4)))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, batch_first: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: N x T x D
        y = self.norm1(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        y = self.attn(y, y, y, need_weights=False)[0]
        x = x + (y if self.batch_first else y.transpose(0, 1))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A small ViT: 4x4 patch-embedding conv, class token, ``depth`` pre-norm blocks of ``nn.MultiheadAttention``
    (even ``heads`` and batch-first by default: the form torch runs fused in eval mode) and an MLP, a Linear head;
    input ``N x 3 x 16 x 16`` (16 patches and the class token)."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, batch_first: bool = True, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 17, dim))
        self.blocks = nn.Sequential(*[_ViTBlock(dim, heads, batch_first) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        seeded(self, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            with torch.no_grad():
                self.cls_token.normal_(0.0, 0.02)
                self.pos.normal_(0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class SwinLikeNet(nn.Module):
    """Window attention as Swin writes it: the ``qkv`` Linear is a module but is called through ``F.linear``, and
    the output projection is a bare Parameter used through ``F.linear`` (neither can be replaced); the MLP and head
    are ordinary modules. Input ``N x 3 x 16 x 16``: a 4x4 patch embedding, then 2x2 windows of 2x2 tokens."""

    def __init__(self, dim: int = 16, heads: int = 2, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj_weight = nn.Parameter(torch.empty(dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, num_classes)
        self.heads = heads
        seeded(self, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.proj_weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)  # N x D x 4 x 4
        n, d = x.shape[:2]
        windows = x.reshape(n, d, 2, 2, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(n * 4, 4, d)  # 4 windows of 4 tokens
        y = nn.functional.linear(self.norm1(windows), self.qkv.weight, self.qkv.bias)
        q, k, v = y.reshape(n * 4, 4, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        y = (attention @ v).transpose(1, 2).reshape(n * 4, 4, d)
        windows = windows + nn.functional.linear(y, self.proj_weight)
        windows = windows + self.fc2(nn.functional.gelu(self.fc1(self.norm2(windows))))
        return self.head(windows.reshape(n, 16, d).mean(1))
class _BasicBlock(nn.Module):
    """torchvision's ResNet basic block (conv1/bn1/conv2/bn2, ``downsample`` = 1x1 conv + BN when the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.downsample = None
        if stride != 1 or channels_in != channels_out:
            self.downsample = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), nn.BatchNorm2d(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    """A narrow ResNet with torchvision's layer names (conv1, bn1, layer1.0.conv1, ..., fc) and its stages of
    ``blocks``: (2, 2, 2, 2) is resnet18's shape, (3, 4, 6, 3) resnet34's. Channels ``width`` x (1, 2, 4, 8);
    a 3x3 stem without max-pooling, so small inputs (``N x 3 x 16 x 16``) run in milliseconds."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 4, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        channels = width
        for stage, count in enumerate(blocks):
            out = width * 2**stage
            layers = [_BasicBlock(channels, out, 1 if stage == 0 else 2)] + [_BasicBlock(out, out, 1) for _ in range(count - 1)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
            channels = out
        self.stages = len(blocks)
        self.fc = nn.Linear(channels, num_classes)
        seeded(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        for stage in range(self.stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(x.mean((2, 3)))


def tiny_resnet18(num_classes: int = 10, width: int = 4, seed: int = 0) -> TinyResNet:
    """resnet18's shape (2, 2, 2, 2 basic blocks), narrow (see ``TinyResNet``)."""
    return TinyResNet((2, 2, 2, 2), width, num_classes, seed)


def tiny_resnet34(num_classes: int = 10, width: int = 4, seed: int = 0) -> TinyResNet:
    """resnet34's shape (3, 4, 6, 3 basic blocks), narrow (see ``TinyResNet``)."""
    return TinyResNet((3, 4, 6, 3), width, num_classes, seed)


class LayerConfig(NamedTuple):
    """One layer and the shape of an input it accepts."""

    module: nn.Module
    input_shape: tuple[int, ...]

    @property
    def name(self) -> str:
        """A readable id: type, channels, kernel, every non-default geometry argument, bias and input shape."""
        m = self.module
        shape = "x".join(map(str, self.input_shape))
        if isinstance(m, nn.Linear):
            return f"Linear{m.in_features}-{m.out_features}-bias{m.bias is not None}-in{shape}"
        ones, zeros = (1,) * len(m.kernel_size), (0,) * len(m.kernel_size)
        parts = [f"{type(m).__name__}{m.in_channels}-{m.out_channels}-k{'x'.join(map(str, m.kernel_size))}"]
        for key, tag, default in (("stride", "s", ones), ("padding", "p", zeros), ("dilation", "d", ones), ("padding_mode", "", "zeros")):
            value = getattr(m, key)
            if value != default:
                parts.append(f"{tag}{value if isinstance(value, str) else 'x'.join(map(str, value))}")
        return "-".join(parts + [f"bias{m.bias is not None}", f"in{shape}"])


def conv_configs(seed: int = 0) -> list[LayerConfig]:
    """Conv1d/Conv2d/Conv3d layers covering kernel shapes, stride, padding (ints, tuples, 'same', 'valid'),
    every padding mode, dilation, bias, unbatched inputs, and N below/above the kernel size."""
    c3, c2, c1 = nn.Conv3d, nn.Conv2d, nn.Conv1d
    configs = [
        LayerConfig(c2(4, 6, 3, padding=1), (2, 4, 9, 9)),
        LayerConfig(c2(3, 5, (9, 1), padding=(4, 0)), (2, 3, 11, 6)),
        LayerConfig(c2(3, 5, (1, 5), stride=(1, 2), padding=(0, 2), bias=False), (1, 3, 6, 11)),
        LayerConfig(c2(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), bias=False), (2, 4, 9, 8)),
        LayerConfig(c2(3, 4, (5, 1), dilation=(2, 1), padding="same"), (1, 3, 12, 7)),
        LayerConfig(c2(4, 5, 3, padding="same", padding_mode="reflect"), (2, 4, 7, 8)),
        LayerConfig(c2(4, 5, 3, padding="valid", bias=False), (1, 4, 8, 9)),
        LayerConfig(c2(4, 6, 3, stride=2, padding=1, padding_mode="replicate"), (2, 4, 9, 10)),
        LayerConfig(c2(3, 6, 3, padding=1, padding_mode="circular", bias=False), (1, 3, 8, 8)),
        LayerConfig(c2(3, 4, (3, 5), padding=(2, 1), dilation=2, padding_mode="reflect"), (1, 3, 9, 10)),
        LayerConfig(c2(4, 6, 3, stride=2, padding=2, dilation=2), (2, 4, 11, 11)),
        LayerConfig(c2(3, 5, 5, stride=(2, 3), padding=(2, 1), padding_mode="circular"), (1, 3, 10, 12)),
        LayerConfig(c2(6, 8, 1), (2, 6, 5, 5)),
        LayerConfig(c2(3, 4, (2, 4), padding="same", bias=False), (1, 3, 7, 9)),
        LayerConfig(c2(3, 4, (4, 2), padding="same", dilation=(1, 2), padding_mode="replicate"), (1, 3, 9, 8)),
        LayerConfig(c2(2, 16, 3, padding=1), (1, 2, 6, 6)),
        LayerConfig(c2(8, 2, 3, stride=(1, 2), padding=(0, 1), padding_mode="replicate"), (2, 8, 7, 7)),
        LayerConfig(c2(4, 5, 3, padding=1), (4, 7, 7)),
        LayerConfig(c1(4, 6, 3, padding=1), (2, 4, 16)),
        LayerConfig(c1(4, 6, 5, stride=2, padding="valid", bias=False), (3, 4, 17)),
        LayerConfig(c1(3, 5, 3, dilation=2, padding="same", padding_mode="reflect"), (2, 3, 15)),
        LayerConfig(c1(3, 7, 7, stride=3, padding=3, padding_mode="circular"), (1, 3, 20)),
        LayerConfig(c1(6, 4, 1), (2, 6, 9)),
        LayerConfig(c1(3, 4, 4, padding="same", padding_mode="replicate", bias=False), (1, 3, 12)),
        LayerConfig(c1(4, 5, 3, stride=2, padding=(2,), dilation=(2,)), (4, 13)),
        LayerConfig(c3(3, 5, 3, padding=1), (2, 3, 5, 6, 6)),
        LayerConfig(c3(4, 6, (3, 1, 1), padding=(1, 0, 0), bias=False), (1, 4, 6, 5, 5)),
        LayerConfig(c3(3, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), padding_mode="replicate"), (2, 3, 4, 7, 7)),
        LayerConfig(c3(3, 4, 3, dilation=2, padding="same", padding_mode="reflect"), (1, 3, 7, 7, 7)),
        LayerConfig(c3(4, 5, (2, 3, 3), stride=2, padding="valid", padding_mode="circular", bias=False), (1, 4, 6, 7, 7)),
        LayerConfig(c3(4, 6, 1), (2, 4, 3, 4, 4)),
        LayerConfig(c3(3, 4, 3, padding=1), (3, 5, 5, 5)),
    ]
    return [LayerConfig(seeded(c.module, seed + i), c.input_shape) for i, c in enumerate(configs)]


def linear_configs(seed: int = 0) -> list[LayerConfig]:
    """``nn.Linear`` layers with 2-D, 3-D and 1-D inputs, with and without bias."""
    configs = [
        LayerConfig(nn.Linear(12, 8), (3, 12)),
        LayerConfig(nn.Linear(6, 10, bias=False), (2, 3, 6)),
        LayerConfig(nn.Linear(9, 7), (9,)),
    ]
    return [LayerConfig(seeded(c.module, seed + i), c.input_shape) for i, c in enumerate(configs)]


def method_cases(configs: list[LayerConfig]) -> list[tuple[int, str, str]]:
    """``(config index, method name, test id)`` for every factorisation that applies to each config."""
    from autodac.factorize import METHODS

    return [
        (i, name, f"{config.name}-{name}")
        for i, config in enumerate(configs)
        for name, method in METHODS.items()
        if method.applies_to(tuple(config.module.weight.shape))
    ]

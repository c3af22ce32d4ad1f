"""Vision towers behind one interface: `tower(pixel_values[N,3,R,R]) -> features[N, T, C]`.

`T = feature_grid**2 (+1 when has_cls)`, the CLS token first, patches row-major. The model only
relies on `hidden_size`, `feature_grid` and `has_cls`, so a new encoder is one class here plus
its geometry, never a change to the pooling or token layout.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedConfig
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange

from dragonfly_med.model.efficientnet_lite import EfficientNetLite0, EfficientNetLite0Config


class ClipVisionTower(CLIPVisionModel):
    """transformers' CLIP vision model returning one hidden layer with its CLS token.

    It subclasses `CLIPVisionModel` rather than wrapping it so that CLIP's own weight
    initialisation applies and its checkpoint keys are CLIP's: transformers 5 holds the layers
    without the `vision_model.` level and maps it away when loading (and back when saving), which
    is registered below for this subclass, so checkpoints keep the released
    `image_encoder.vision_model.*` names.
    """

    has_cls = True

    def __init__(self, config: CLIPVisionConfig, feature_layer: int = -2):
        super().__init__(config)
        self.feature_layer = feature_layer

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def feature_grid(self) -> int:
        return self.config.image_size // self.config.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = super().forward(pixel_values=pixel_values, output_hidden_states=True)
        return outputs.hidden_states[self.feature_layer]


register_checkpoint_conversion_mapping(
    ClipVisionTower.__name__, [PrefixChange(prefix_to_remove="vision_model")], overwrite=True
)


class EfficientNetLite0Tower(nn.Module):
    """EfficientNet-Lite0 without its classifier: the 1280-channel last feature map, flattened
    row-major into tokens (no CLS)."""

    has_cls = False

    def __init__(self, config: EfficientNetLite0Config):
        super().__init__()
        self.config = config
        self.model = EfficientNetLite0(config, num_classes=None)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def feature_grid(self) -> int:
        return self.config.feature_grid

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # channels_last lets oneDNN run the depthwise convs ~2x faster on CPU; same numbers.
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        features = self.model.forward_features(pixel_values)  # [N, C, g, g]
        return features.flatten(2).transpose(1, 2)  # [N, g*g, C], row-major


def build_vision_tower(config: PreTrainedConfig, feature_layer: int = -2) -> nn.Module:
    """The tower for a vision config (CLIP or EfficientNet-Lite0)."""
    if isinstance(config, CLIPVisionConfig):
        return ClipVisionTower(config, feature_layer=feature_layer)
    if isinstance(config, EfficientNetLite0Config):
        return EfficientNetLite0Tower(config)
    raise ValueError(
        f"unsupported vision tower {config.model_type!r} (expected CLIP or EfficientNet-Lite0)"
    )

"""`DragonflyConfig`: a vision config, a Llama text config and the crop geometry, in one file.

Modelled on transformers' `LlavaNextConfig` (sub-configs resolved through `AutoConfig`). The
geometry is stored as a plain dict so that `config.json` says exactly how many tokens each crop
takes; it is derived from the vision tower when not given, so no size is written twice.
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from dragonfly_med.model.efficientnet_lite import EfficientNetLite0Config
from dragonfly_med.model.geometry import Geometry

RELEASED_VISION_TOWER = "openai/clip-vit-large-patch14-336"
# The released v2 pools each medium/high crop's patch grid by 4 per side (24x24 -> 6x6).
RELEASED_POOL_FACTOR = 4
# Tiny default: 7x7 EfficientNet feature map -> 2x2 per medium/high crop, so a 41-crop image is
# 49 + 40 * 4 = 209 visual tokens + 41 separators = 250 positions, which keeps the first token of
# a 135M LLM on a 2-core CPU well under the 2.5 s target (3x3 would be 450 positions).
TINY_POOLED_GRID = 2

PROMPT_FORMATS = ("llama3-dragonfly", "chatml")
# Public CLIPVisionConfig values of the vision towers released checkpoints name, so that a
# released config.json can be read without the hub.
KNOWN_VISION_TOWERS: dict[str, dict] = {
    RELEASED_VISION_TOWER: {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_channels": 3,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "projection_dim": 768,
    },
}


def released_clip_vision_config() -> CLIPVisionConfig:
    """CLIP ViT-L/14 @ 336 px, the released v2 vision tower, from the table above."""
    return CLIPVisionConfig(**KNOWN_VISION_TOWERS[RELEASED_VISION_TOWER])


def released_v2_geometry(clip_vision_config: CLIPVisionConfig) -> Geometry:
    """The released v2 geometry, derived from its CLIP tower: a crop is one CLIP input, the patch
    grid (336 / 14 = 24) is pooled by 4 per side for medium/high crops, CLS kept everywhere."""
    feature_grid = clip_vision_config.image_size // clip_vision_config.patch_size
    return Geometry(
        crop_size=clip_vision_config.image_size,
        feature_grid=feature_grid,
        pooled_grid=feature_grid // RELEASED_POOL_FACTOR,
        cls_token=True,
    )


def tiny_geometry(vision_config: EfficientNetLite0Config) -> Geometry:
    """The tiny default's geometry: crops at the tower's native size (224 px), feature grid from
    the tower's stride (224 / 32 = 7), pooled to `TINY_POOLED_GRID`, no CLS token."""
    return Geometry(
        crop_size=vision_config.image_size,
        feature_grid=vision_config.feature_grid,
        pooled_grid=TINY_POOLED_GRID,
        cls_token=False,
    )


def default_geometry(vision_config: PreTrainedConfig) -> Geometry:
    """The geometry a vision tower implies when a config does not state one."""
    if isinstance(vision_config, EfficientNetLite0Config):
        return tiny_geometry(vision_config)
    if isinstance(vision_config, CLIPVisionConfig):
        return released_v2_geometry(vision_config)
    raise ValueError(f"no default geometry for vision tower {vision_config.model_type!r}")


def named_geometry(name: str) -> Geometry:
    """Geometries that need no weights: `dragonfly-med-v2` (the release) and `tiny`."""
    if name in ("dragonfly-med-v2", "dragonfly-v2"):
        return released_v2_geometry(released_clip_vision_config())
    if name == "tiny":
        return tiny_geometry(EfficientNetLite0Config())
    raise ValueError(f"unknown geometry {name!r}; known: dragonfly-med-v2, tiny")


@strict
class DragonflyConfig(PreTrainedConfig):
    """Dragonfly: vision tower + linear projector + Llama LLM, with multi-resolution crops.

    `image_token_id` marks the positions that receive visual embeddings (one per visual token),
    `separator_token_id` closes each crop's block; both are ordinary vocabulary tokens.
    `prompt_format` names how the processor writes prompts ("llama3-dragonfly" as released,
    "chatml" for the tiny default); `eos_token_ids` are the ids generation stops on (the released
    generation config names the wrong one, so the config carries them).
    `vision_feature_layer` selects the CLIP hidden state (-2, penultimate, as released).
    """

    model_type = "dragonfly"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs=KNOWN_VISION_TOWERS[RELEASED_VISION_TOWER],
        ),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    geometry: dict | None = None
    image_token_id: int | None = None
    separator_token_id: int | None = None
    prompt_format: Literal["llama3-dragonfly", "chatml"] = "llama3-dragonfly"
    eos_token_ids: list[int] | None = None
    vision_feature_layer: int = -2
    projector_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}"
            )
        geometry = (
            Geometry.from_dict(self.geometry)
            if self.geometry
            else default_geometry(self.vision_config)
        )
        self.geometry = geometry.to_dict()

    def get_geometry(self) -> Geometry:
        return Geometry.from_dict(self.geometry)


AutoConfig.register(DragonflyConfig.model_type, DragonflyConfig, exist_ok=True)

"""Dragonfly: a vision tower, a linear projector and a Llama LLM, with multi-resolution crops.

Submodules are named as in the released v2 state dict (`image_encoder`, `vision_embed_tokens`,
`language_model`) so released weights load key for key. Each image arrives as its crops in model
order (low, medium row-major, high row-major). The low crop keeps every feature token; medium and
high crops are mean-pooled from `feature_grid` to `pooled_grid` per side BEFORE the projector:
pooling is a linear map over tokens and the projector is linear (with a bias that averaging
preserves), so the result equals the released project-then-pool order while the projector runs
on ~16x fewer tokens. The visual embeddings then replace, in order, the LLM input embeddings at
the positions holding `image_token_id`; separators are ordinary tokens of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, LlamaForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from dragonfly_med.model.configuration_dragonfly import DragonflyConfig
from dragonfly_med.model.vision import build_vision_tower


class DragonflyPreTrainedModel(PreTrainedModel):
    config_class = DragonflyConfig
    config: DragonflyConfig
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class DragonflyForConditionalGeneration(DragonflyPreTrainedModel, GenerationMixin):
    """The full model. `forward` takes the processor's output; `generate` works as for any LLM,
    the image inputs being used on the prefill step only."""

    def __init__(self, config: DragonflyConfig):
        super().__init__(config)
        self.image_encoder = build_vision_tower(config.vision_config, config.vision_feature_layer)
        self.vision_embed_tokens = nn.Linear(
            self.image_encoder.hidden_size,
            config.text_config.hidden_size,
            bias=config.projector_bias,
        )
        self.language_model = LlamaForCausalLM(config.text_config)
        self.post_init()
        if config.eos_token_ids:
            self.generation_config.eos_token_id = list(config.eos_token_ids)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ---- image encoding -------------------------------------------------------------------

    def pool_crops(self, features: torch.Tensor) -> torch.Tensor:
        """Mean-pool each crop's token grid to `pooled_grid` per side, CLS (if any) kept in front.

        `features` is [M, T, C] in the tower's token layout, with any channel count C, so the
        same function serves before the projector (C = tower width) and after it (C = LLM width).
        Adaptive average pooling equals kernel = stride = grid / pooled when that divides (24 -> 6).
        """
        geometry = self.config.get_geometry()
        n_cls = int(self.image_encoder.has_cls)
        cls, grid = features[:, :n_cls], features[:, n_cls:]
        m, _, c = grid.shape
        if m == 0:  # an image seen at the low level only
            return features[:, :n_cls]
        side = self.image_encoder.feature_grid
        grid = grid.reshape(m, side, side, c).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(grid, geometry.pooled_grid).flatten(2).transpose(1, 2)
        return torch.cat([cls, pooled], dim=1)

    def _tower_features(
        self, pixel_values: torch.Tensor, num_crops: Sequence[int] | torch.Tensor | None
    ):
        """Run the tower on all crops and split the features per image."""
        if num_crops is None:
            num_crops = [pixel_values.shape[0]]
        elif isinstance(num_crops, torch.Tensor):
            num_crops = num_crops.tolist()
        if sum(num_crops) != pixel_values.shape[0]:
            raise ValueError(
                f"num_crops {list(num_crops)} sums to {sum(num_crops)}, but pixel_values has {pixel_values.shape[0]} crops"
            )
        tower = next(self.image_encoder.parameters())
        features = self.image_encoder(pixel_values.to(device=tower.device, dtype=tower.dtype))
        projector = self.vision_embed_tokens.weight  # may sit on another device (device_map)
        return features.to(device=projector.device, dtype=projector.dtype).split(list(num_crops))

    def encode_images(
        self, pixel_values: torch.Tensor, num_crops: Sequence[int] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Crops of one or more images -> one [visual_tokens, hidden] tensor per image.

        `pixel_values` is [sum(num_crops), 3, R, R], each image's crops in model order; crop 0 of
        each image is its low view (unpooled), the others are pooled before the projector.
        """
        embeds = []
        for features in self._tower_features(pixel_values, num_crops):
            low = self.vision_embed_tokens(features[0])
            zoomed = self.vision_embed_tokens(self.pool_crops(features[1:])).flatten(0, 1)
            embeds.append(torch.cat([low, zoomed]))
        return embeds

    def encode_images_pool_after(
        self, pixel_values: torch.Tensor, num_crops: Sequence[int] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The released order (project every token, then pool): the reference `encode_images`
        is tested against and benchmarked with."""
        embeds = []
        for features in self._tower_features(pixel_values, num_crops):
            projected = self.vision_embed_tokens(features)
            embeds.append(torch.cat([projected[0], self.pool_crops(projected[1:]).flatten(0, 1)]))
        return embeds

    def merge_image_embeds(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        image_embeds: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Put the visual embeddings, in order, at the positions holding `image_token_id`."""
        mask = input_ids == self.config.image_token_id
        visual = (
            torch.cat(list(image_embeds))
            if len(image_embeds)
            else inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
        )
        n_slots = int(mask.sum())
        if n_slots != visual.shape[0]:
            raise ValueError(
                f"the prompt has {n_slots} image placeholder tokens (id {self.config.image_token_id}) but the "
                f"images give {visual.shape[0]} visual embeddings; build inputs with DragonflyProcessor so the "
                "image block matches the model's geometry"
            )
        visual = visual.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), visual)

    # ---- forward / generate ---------------------------------------------------------------

    def _image_already_cached(self, input_ids: torch.Tensor | None, cache: Cache | None) -> bool:
        """A later turn continuing from a KV cache: the new tokens hold no placeholder because the
        image block is in the cache already, so image inputs passed again are not re-encoded."""
        return (
            input_ids is not None
            and cache is not None
            and cache.get_seq_length() > 0
            and not (input_ids == self.config.image_token_id).any()
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        num_crops: Sequence[int] | torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_embeds: Sequence[torch.Tensor] | None = None,
        image_sizes: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`input_ids` with the image block already expanded (one placeholder per visual token);
        images as `pixel_values` + `num_crops`, or as `image_embeds` from `encode_images` (so a
        chat can encode its image once); continuing from a `cache` that already holds the image
        block, image inputs are ignored. `image_sizes` is accepted so that the processor's output
        can be passed as is; the crop layout is already in `num_crops` and the placeholders.
        `past_key_values` is accepted as the old name of `cache`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("pass pixel_values or image_embeds, not both")
        if self._image_already_cached(input_ids, cache):
            pixel_values = image_embeds = None
        if pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, num_crops)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if image_embeds is not None:
                inputs_embeds = self.merge_image_embeds(input_ids, inputs_embeds, image_embeds)
            elif (input_ids == self.config.image_token_id).any():
                raise ValueError(
                    "input_ids contain image placeholder tokens but no pixel_values or image_embeds were given"
                )
        elif image_embeds is not None:
            raise ValueError(
                "images need input_ids to find the placeholder positions, not inputs_embeds"
            )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        num_crops: Sequence[int] | torch.Tensor | None = None,
        image_embeds: Sequence[torch.Tensor] | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """As for an LLM, plus the image inputs on the prefill step only (later steps feed one new
        token each, the image being in the KV cache already)."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, is_first_iteration=is_first_iteration, **kwargs
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update(
                pixel_values=pixel_values, num_crops=num_crops, image_embeds=image_embeds
            )
        return model_inputs


__all__ = ["DragonflyPreTrainedModel", "DragonflyForConditionalGeneration"]

"""Conversation + image -> the token sequence the model was trained on.

Two prompt formats, chosen by the model config's `prompt_format`:

- `"llama3-dragonfly"` (the released checkpoint, byte for byte): the image block comes FIRST, then
  `<|begin_of_text|>`, then hand-written Llama-3 headers per turn, no system turn:
  `[image block]<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>`
  `<|start_header_id|>assistant<|end_header_id|>\\n\\n{a}<|eot_id|>` ...
- `"chatml"` (the tiny default, SmolLM2-Instruct): no system turn; the image block sits INSIDE the
  first user message, right after `<|im_start|>user\\n` and before the question, because that is
  where an instruct model trained on ChatML expects content:
  `<|im_start|>user\\n[image block]{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n` ...

The image block is, for each crop of the plan, `crop_tokens` placeholders then ONE separator
(2098 positions for the released geometry). Token ids come from the tokenizer and the
`image_token` / `separator_token` strings, never from constants. Text is tokenized as whole strings
(as the release did) with character offsets, so labels cover exactly each answer + its end token.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from dragonfly_med.model.geometry import CropPlan
from dragonfly_med.model.image_processing_dragonfly import DragonflyImageProcessor

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT_FORMATS = ("llama3-dragonfly", "chatml")
Turn = tuple[str, str | None]


@dataclass(frozen=True)
class PromptTemplate:
    """The literal text around each turn. `answer_end` closes an answer and is learned;
    `turn_gap` follows it (not learned) before the next turn opens."""

    begin: str  # after the image block (llama3) / before the first turn
    user_open: str
    user_end: str  # closes the question
    assistant_open: str  # the generation prompt
    answer_end: str
    turn_gap: str
    image_in_first_turn: bool  # False: the image block precedes everything


TEMPLATES = {
    "llama3-dragonfly": PromptTemplate(
        begin="<|begin_of_text|>",
        user_open="<|start_header_id|>user<|end_header_id|>\n\n",
        user_end="<|eot_id|>",
        assistant_open="<|start_header_id|>assistant<|end_header_id|>\n\n",
        answer_end="<|eot_id|>",
        turn_gap="",
        image_in_first_turn=False,
    ),
    "chatml": PromptTemplate(
        begin="",
        user_open="<|im_start|>user\n",
        user_end="<|im_end|>\n",
        assistant_open="<|im_start|>assistant\n",
        answer_end="<|im_end|>",
        turn_gap="\n",
        image_in_first_turn=True,
    ),
}


@dataclass
class EncodedSample:
    """One tokenized sample before batching."""

    input_ids: list[int]
    labels: list[int]
    image_span: tuple[int, int] = (0, 0)  # [start, end) of the image block in input_ids
    truncated: bool = False


class DragonflyProcessor(ProcessorMixin):
    """Tokenizer + `DragonflyImageProcessor`, writing prompts in the model's `prompt_format`.

    `__call__` returns `input_ids`, `attention_mask`, `pixel_values`, `num_crops` (per image, in
    sample order) and, with `return_labels=True`, `labels` (-100 everywhere but the assistant
    answers and their end token). Batches are right-padded for training, left-padded for
    generation. `num_truncated` is set as an attribute of the returned batch.
    """

    def __init__(
        self,
        image_processor: DragonflyImageProcessor | None = None,
        tokenizer: Any = None,
        prompt_format: str = "llama3-dragonfly",
        image_token: str = "<|reserved_special_token_0|>",
        separator_token: str = "<|reserved_special_token_1|>",
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(
                f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}"
            )
        self.prompt_format = prompt_format
        self.image_token = image_token
        self.separator_token = separator_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = self._token_id(image_token)
        self.separator_token_id = self._token_id(separator_token)

    # ----------------------------------------------------------------- token ids

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(token_id)

    @property
    def template(self) -> PromptTemplate:
        return TEMPLATES[self.prompt_format]

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end an answer (`<|eot_id|>` / `<|im_end|>`): generation must stop on them."""
        return [self._token_id(self.template.answer_end)]

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        right_pad = tok.convert_tokens_to_ids(
            "<|finetune_right_pad_id|>"
        )  # Llama 3.1 has no pad token
        right_pad = None if right_pad == tok.unk_token_id else right_pad
        for candidate in (tok.pad_token_id, right_pad, tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    # ----------------------------------------------------------------- image block

    def image_block_ids(self, plan: CropPlan) -> list[int]:
        """Per crop: its placeholders, then one separator (released layout)."""
        ids: list[int] = []
        for tokens in plan.crop_tokens:
            ids += [self.image_token_id] * tokens + [self.separator_token_id]
        return ids

    @staticmethod
    def image_positions(plan: CropPlan) -> int:
        """LLM positions the image block takes (visual tokens + separators)."""
        return plan.budget.image_positions

    # ----------------------------------------------------------------- prompts

    def _text_ids(
        self, text: str, answer_spans: list[tuple[int, int]]
    ) -> tuple[list[int], list[int]]:
        """Tokenize a whole string (specials parsed) and label the tokens inside `answer_spans`."""
        if not text:
            return [], []
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for i, (start, _end) in enumerate(enc["offset_mapping"]):
            if any(lo <= start < hi for lo, hi in answer_spans):
                labels[i] = ids[i]
        return ids, labels

    def _turn_text(
        self, turns: list[Turn], first: bool, add_generation_prompt: bool
    ) -> tuple[str, str, list[tuple[int, int]]]:
        """(text before the image block, text after it, answer char spans in the latter)."""
        t = self.template
        head = (t.begin + t.user_open) if (first and t.image_in_first_turn) else ""
        text = "" if head else (t.begin if first else "")
        spans: list[tuple[int, int]] = []
        for index, (question, answer) in enumerate(turns):
            if not (index == 0 and head):
                text += t.user_open
            text += question + t.user_end
            if answer is None:
                if index != len(turns) - 1:
                    raise ValueError("only the last turn may lack an answer")
                text += t.assistant_open if add_generation_prompt else ""
                break
            text += t.assistant_open
            start = len(text)
            text += answer + t.answer_end
            spans.append((start, len(text)))
            text += t.turn_gap
        return head, text, spans

    def build_prompt_ids(
        self,
        conversation: list[Turn] | str,
        plan: CropPlan | None = None,
        *,
        add_generation_prompt: bool = True,
        first: bool = True,
    ) -> EncodedSample:
        """Token ids (+ labels) of one sample. `plan` None means a text-only sample.

        `first=False` writes turns that continue an existing conversation (no `<|begin_of_text|>`,
        no image block), which the chat engine appends to its KV cache.
        """
        if isinstance(conversation, str):
            conversation = [(conversation, None)]
        if not conversation:
            raise ValueError("a conversation needs at least one turn")
        head, text, spans = self._turn_text(list(conversation), first, add_generation_prompt)
        head_ids, head_labels = self._text_ids(head, [])
        block = self.image_block_ids(plan) if (plan is not None and first) else []
        text_ids, text_labels = self._text_ids(text, spans)
        start = len(head_ids)
        return EncodedSample(
            input_ids=head_ids + block + text_ids,
            labels=head_labels + [IGNORE_INDEX] * len(block) + text_labels,
            image_span=(start, start + len(block)),
        )

    def turn_ids(self, question: str) -> list[int]:
        """Ids of a follow-up user turn through the assistant header (for KV-cache reuse)."""
        return self.build_prompt_ids([(question, None)], None, first=False).input_ids

    def answer_close_ids(self) -> list[int]:
        """Ids that follow a generated answer's end token before the next turn (ChatML's newline)."""
        return self._text_ids(self.template.turn_gap, [])[0]

    # ----------------------------------------------------------------- batching

    def __call__(
        self,
        images: Any = None,
        conversation: list[Turn] | list[list[Turn]] | None = None,
        text: str | list[str] | None = None,
        *,
        add_generation_prompt: bool = True,
        return_labels: bool = False,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors: str = "pt",
        return_pixels: bool = True,
        **kwargs: Any,
    ) -> BatchFeature:
        """Images + conversations -> a padded batch.

        `conversation` is one conversation `[(question, answer | None), ...]` or a list of them;
        `text` is a shortcut for single questions. `images` is one image, or one per sample
        (None for a text-only sample). Truncation (`max_length`) drops tokens from the end of the
        text and never cuts the image block; truncated samples are counted in `num_truncated`.
        `return_pixels=False` plans the crops but skips the pixels (a trainer that reads cached
        tower features needs only the token layout).
        """
        conversations = _as_conversations(conversation, text)
        image_list = _as_image_list(images, len(conversations))
        real_images = [im for im in image_list if im is not None]
        pixel = self.image_processor(real_images) if real_images and return_pixels else None
        plans = [self.image_processor.plan(im) for im in real_images]
        samples, plan_iter = [], iter(plans)
        for conv, image in zip(conversations, image_list, strict=True):
            plan = next(plan_iter) if image is not None else None
            sample = self.build_prompt_ids(conv, plan, add_generation_prompt=add_generation_prompt)
            samples.append(self._truncate(sample, max_length))
        side = padding_side or ("right" if return_labels else "left")
        data = self.collate(samples, side, return_labels)
        if pixel is not None:
            data["pixel_values"] = pixel["pixel_values"]
            data["num_crops"] = pixel["num_crops"]
            data["image_sizes"] = pixel["image_sizes"]
        batch = BatchFeature(data=data)
        batch.num_truncated = sum(s.truncated for s in samples)
        batch.plans = plans
        if batch.num_truncated:
            logger.warning(
                "%d of %d samples truncated to max_length=%s",
                batch.num_truncated,
                len(samples),
                max_length,
            )
        return batch

    @staticmethod
    def _truncate(sample: EncodedSample, max_length: int | None) -> EncodedSample:
        if max_length is None or len(sample.input_ids) <= max_length:
            return sample
        if sample.image_span[1] >= max_length:
            raise ValueError(
                f"max_length={max_length} cannot hold the image block ({sample.image_span[1]} positions "
                "with what precedes it); raise max_length or use a smaller geometry"
            )
        sample.input_ids = sample.input_ids[:max_length]
        sample.labels = sample.labels[:max_length]
        sample.truncated = True
        return sample

    def collate(
        self, samples: list[EncodedSample], side: str = "left", return_labels: bool = False
    ) -> dict[str, torch.Tensor]:
        """Pad `build_prompt_ids` samples into `input_ids` + `attention_mask` (+ `labels`): left
        for generation, right for training."""
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        width = max(len(s.input_ids) for s in samples)
        ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s.input_ids)
            cols = slice(0, n) if side == "right" else slice(width - n, width)
            ids[row, cols] = torch.tensor(s.input_ids, dtype=torch.long)
            mask[row, cols] = 1
            labels[row, cols] = torch.tensor(s.labels, dtype=torch.long)
        data = {"input_ids": ids, "attention_mask": mask}
        if return_labels:
            data["labels"] = labels
        return data

    # ----------------------------------------------------------------- decoding

    def decode(self, ids: Any, **kwargs: Any) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(ids, **kwargs)

    # ----------------------------------------------------------------- save / load

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Tokenizer files + `preprocessor_config.json` (image processor) + `processor_config.json`."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        path = os.path.join(save_directory, "processor_config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.processor_config(), f, indent=2, sort_keys=True)
            f.write("\n")
        return [path]

    def processor_config(self) -> dict[str, Any]:
        return {
            "processor_class": type(self).__name__,
            "prompt_format": self.prompt_format,
            "image_token": self.image_token,
            "separator_token": self.separator_token,
        }

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> DragonflyProcessor:
        """Load what `save_pretrained` wrote from a local directory (tokenizer kwargs pass on)."""
        directory = os.fspath(pretrained_model_name_or_path)
        with open(os.path.join(directory, "processor_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        image_processor = DragonflyImageProcessor.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        return cls(
            image_processor,
            tokenizer,
            prompt_format=config.get("prompt_format", "llama3-dragonfly"),
            image_token=config.get("image_token", "<|reserved_special_token_0|>"),
            separator_token=config.get("separator_token", "<|reserved_special_token_1|>"),
        )

    @classmethod
    def from_model_config(
        cls, config: Any, tokenizer: Any, image_processor: DragonflyImageProcessor | None = None
    ) -> DragonflyProcessor:
        """The processor a `DragonflyConfig` implies: its geometry, its tower's normalisation, its
        prompt format, and its placeholder / separator tokens (read back from their ids)."""
        if image_processor is None:
            image_processor = DragonflyImageProcessor.from_model_config(config)
        tokens = tokenizer.convert_ids_to_tokens([config.image_token_id, config.separator_token_id])
        return cls(
            image_processor,
            tokenizer,
            prompt_format=config.prompt_format,
            image_token=tokens[0],
            separator_token=tokens[1],
        )


def _as_conversations(conversation: Any, text: str | list[str] | None) -> list[list[Turn]]:
    """Normalise the accepted input shapes to a list of conversations."""
    if conversation is None and text is None:
        raise ValueError("pass `conversation` or `text`")
    if conversation is None:
        texts = [text] if isinstance(text, str) else list(text)
        return [[(t, None)] for t in texts]
    if isinstance(conversation, str):
        return [[(conversation, None)]]
    conversation = list(conversation)
    if conversation and _is_turn(conversation[0]):
        return [[tuple(t) for t in conversation]]
    return [[tuple(t) for t in conv] for conv in conversation]


def _is_turn(item: Any) -> bool:
    return (
        isinstance(item, tuple | list)
        and len(item) == 2
        and isinstance(item[0], str)
        and (item[1] is None or isinstance(item[1], str))
    )


def _as_image_list(images: Any, n_samples: int) -> list[Any]:
    if images is None:
        return [None] * n_samples
    if not isinstance(images, list | tuple):
        images = [images]
    if len(images) != n_samples:
        raise ValueError(
            f"got {len(images)} images for {n_samples} samples (use None for text-only samples)"
        )
    return list(images)


def _register_auto_classes() -> None:
    """Let `AutoProcessor` / `AutoImageProcessor.from_pretrained(dir)` find our classes."""
    from transformers import AutoImageProcessor, AutoProcessor

    from dragonfly_med.model.configuration_dragonfly import DragonflyConfig

    AutoImageProcessor.register(
        DragonflyConfig, image_processor_classes={"pil": DragonflyImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(DragonflyConfig, DragonflyProcessor, exist_ok=True)


_register_auto_classes()

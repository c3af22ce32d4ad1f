"""DragonflyProcessor: the released token sequence with the REAL Llama-3.1 tokenizer (fetched
with npm, skipped when unavailable), ChatML for the tiny default with SmolLM2's tokenizer,
label masking, padding, truncation, continuation prefixes and save/load."""

import numpy as np
import pytest
import torch
from dragonfly_test_assets import llama3_tokenizer, smollm2_tokenizer
from PIL import Image
from transformers import AutoProcessor

from dragonfly_med.model.configuration_dragonfly import named_geometry
from dragonfly_med.model.image_processing_dragonfly import DragonflyImageProcessor
from dragonfly_med.model.processing_dragonfly import IGNORE_INDEX, DragonflyProcessor

RELEASED = named_geometry("dragonfly-med-v2")
# Llama-3 ids, from Meta's tokenizer (checked against the fetched file below).
BEGIN, START_HEADER, END_HEADER, EOT, PLACEHOLDER, SEPARATOR = 128000, 128006, 128007, 128009, 128002, 128003
USER, ASSISTANT, NEWLINES = 882, 78191, 271


@pytest.fixture(scope="module")
def llama_processor():
    tokenizer = llama3_tokenizer()
    if tokenizer is None:
        pytest.skip("Llama-3.1 tokenizer unavailable (npm or registry unreachable)")
    return DragonflyProcessor(DragonflyImageProcessor(geometry=RELEASED), tokenizer)


@pytest.fixture(scope="module")
def chatml_processor():
    geometry = named_geometry("tiny")
    image_processor = DragonflyImageProcessor(geometry=geometry)
    return DragonflyProcessor(image_processor, smollm2_tokenizer(), prompt_format="chatml",
                              image_token="<reponame>", separator_token="<file_sep>")  # fmt: skip


def photo(width=2000, height=800):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_special_token_ids_of_real_tokenizer(llama_processor):
    tok = llama_processor.tokenizer
    names = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
             "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]  # fmt: skip
    assert tok.convert_tokens_to_ids(names) == [BEGIN, START_HEADER, END_HEADER, EOT, PLACEHOLDER, SEPARATOR]
    assert (llama_processor.image_token_id, llama_processor.separator_token_id) == (PLACEHOLDER, SEPARATOR)
    assert llama_processor.eos_token_ids == [EOT]
    assert tok("user", add_special_tokens=False)["input_ids"] == [USER]
    assert tok("assistant", add_special_tokens=False)["input_ids"] == [ASSISTANT]


def test_released_token_layout(llama_processor):
    batch = llama_processor(photo(), text="What is this?")
    ids = batch["input_ids"][0].tolist()
    plan = batch.plans[0]
    assert plan.medium_grid == (4, 1) and plan.num_crops == 41
    assert llama_processor.image_positions(plan) == 2098
    block = ids[:2098]
    assert block.count(PLACEHOLDER) == 2057 and block.count(SEPARATOR) == 41
    assert [i for i, t in enumerate(block) if t == SEPARATOR] == list(plan.separator_offsets)
    assert block[:577] == [PLACEHOLDER] * 577 and block[577] == SEPARATOR
    assert block[578:578 + 37] == [PLACEHOLDER] * 37 and block[578 + 37] == SEPARATOR
    question = llama_processor.tokenizer("What is this?", add_special_tokens=False)["input_ids"]
    assert ids[2098:] == [BEGIN, START_HEADER, USER, END_HEADER, NEWLINES, *question, EOT,
                          START_HEADER, ASSISTANT, END_HEADER, NEWLINES]  # fmt: skip
    assert ids.count(BEGIN) == 1
    assert batch["pixel_values"].shape == (41, 3, 336, 336)
    assert batch["num_crops"].tolist() == [41]
    assert batch["attention_mask"].sum().item() == len(ids)


def test_released_prompt_text_matches_hand_written_template(llama_processor):
    tok = llama_processor.tokenizer
    sample = llama_processor.build_prompt_ids([("Is there a fracture?", "No.")], None, add_generation_prompt=False)
    text = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nIs there a fracture?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nNo.<|eot_id|>")  # fmt: skip
    assert sample.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(sample.input_ids) == text


def test_labels_cover_answers_and_their_end_only(llama_processor):
    conversation = [("What modality?", "A chest X-ray."), ("Any fracture?", "No fracture is seen.")]
    batch = llama_processor(photo(600, 400), conversation, return_labels=True)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])
    assert llama_processor.tokenizer.decode(ids[kept]) == "A chest X-ray.<|eot_id|>No fracture is seen.<|eot_id|>"
    assert not kept[:2098].any()  # image block
    assert (ids[kept] == EOT).sum() == 2 and (ids == EOT).sum() == 4  # question eot ids masked


def test_text_only_sample_has_no_image_block(llama_processor):
    batch = llama_processor(None, [("Hello?", None)])
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == BEGIN and PLACEHOLDER not in ids and SEPARATOR not in ids
    assert "pixel_values" not in batch


def test_padding_sides_and_mixed_batch(llama_processor):
    conversations = [[("Q one?", "A one.")], [("Q two, a longer question here?", "A two.")]]
    train = llama_processor([photo(300, 300), None], conversations, return_labels=True)
    lengths = train["attention_mask"].sum(1).tolist()
    assert lengths[0] > lengths[1]  # image sample longer
    assert train["attention_mask"][1, : lengths[1]].all() and not train["attention_mask"][1, lengths[1] :].any()
    assert (train["labels"][1, lengths[1] :] == IGNORE_INDEX).all()
    assert train["num_crops"].tolist() == [41] and train["pixel_values"].shape[0] == 41
    gen = llama_processor([photo(300, 300), None], [[("Q one?", None)], [("Q two?", None)]])
    mask = gen["attention_mask"][1]
    assert not mask[0] and mask[-1]  # left padded for generation
    assert gen["input_ids"][1, -1].item() == NEWLINES


def test_planning_without_pixels_gives_the_same_tokens(llama_processor):
    """A trainer reading cached tower features asks for the token layout only."""
    images, conversations = [photo(300, 200), None, photo(90, 700)], [[("Q?", "A.")]] * 3
    full = llama_processor(images, conversations, return_labels=True)
    planned = llama_processor(images, conversations, return_labels=True, return_pixels=False)
    assert "pixel_values" not in planned and "num_crops" not in planned
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(planned[key], full[key])
    assert planned.plans == full.plans


def test_truncation_never_cuts_the_image_block(llama_processor):
    long_answer = "word " * 300
    batch = llama_processor([photo(300, 300), photo(300, 300)], [[("Q?", long_answer)], [("Q?", "short")]],
                            return_labels=True, max_length=2200)  # fmt: skip
    assert batch.num_truncated == 1
    assert batch["input_ids"].shape[1] == 2200
    assert batch["input_ids"][0, :2098].tolist().count(PLACEHOLDER) == 2057
    with pytest.raises(ValueError, match="image block"):
        llama_processor(photo(300, 300), [("Q?", "A.")], return_labels=True, max_length=1000)


@pytest.mark.parametrize("fmt", ["llama3-dragonfly", "chatml"])
def test_follow_up_turn_extends_the_previous_ids(fmt, request):
    """The chat engine appends `answer + end + answer_close_ids() + turn_ids(q)` to its cache:
    that must be exactly the ids of the whole conversation written at once."""
    proc = request.getfixturevalue("llama_processor" if fmt == "llama3-dragonfly" else "chatml_processor")
    plan = proc.image_processor.plan((640, 480))
    first = proc.build_prompt_ids([("Q1?", None)], plan).input_ids
    answer = proc.tokenizer(" An answer.", add_special_tokens=False)["input_ids"]
    continued = first + answer + proc.eos_token_ids + proc.answer_close_ids() + proc.turn_ids("Q2?")
    whole = proc.build_prompt_ids([("Q1?", " An answer."), ("Q2?", None)], plan).input_ids
    assert continued == whole


def test_chatml_image_block_inside_first_user_turn(chatml_processor):
    proc = chatml_processor
    batch = proc(photo(1024, 1024), [("What is it?", "A gradient."), ("Sure?", "Yes.")], return_labels=True)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0]
    head = proc.tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    plan = batch.plans[0]
    n_block = plan.budget.image_positions
    assert n_block == 250
    assert ids[: len(head)] == head
    block = ids[len(head) : len(head) + n_block]
    assert block.count(proc.image_token_id) == plan.budget.visual_tokens and block.count(proc.separator_token_id) == 41
    text = proc.tokenizer.decode(ids[len(head) + n_block :])
    assert text == "What is it?<|im_end|>\n<|im_start|>assistant\nA gradient.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
    kept = labels != IGNORE_INDEX
    assert proc.tokenizer.decode(batch["input_ids"][0][kept]) == "A gradient.<|im_end|>Yes.<|im_end|>"


def test_save_load_round_trip(tmp_path, chatml_processor):
    chatml_processor.save_pretrained(tmp_path)
    loaded = DragonflyProcessor.from_pretrained(tmp_path)
    assert loaded.prompt_format == "chatml"
    assert (loaded.image_token_id, loaded.separator_token_id) == (chatml_processor.image_token_id, chatml_processor.separator_token_id)
    assert loaded.image_processor.to_dict() == chatml_processor.image_processor.to_dict()
    auto = AutoProcessor.from_pretrained(tmp_path)  # registered: transformers' entry point works too
    assert isinstance(auto, DragonflyProcessor) and auto.prompt_format == "chatml"
    image = photo(500, 300)
    a, b = loaded(image, text="Hi?"), chatml_processor(image, text="Hi?")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_unknown_tokens_and_formats_are_errors(chatml_processor):
    with pytest.raises(ValueError, match="prompt_format"):
        DragonflyProcessor(chatml_processor.image_processor, chatml_processor.tokenizer, prompt_format="vicuna")
    with pytest.raises(ValueError, match="not in the tokenizer"):
        DragonflyProcessor(chatml_processor.image_processor, chatml_processor.tokenizer, prompt_format="chatml",
                           image_token="<|no_such_token|>", separator_token="<file_sep>")  # fmt: skip

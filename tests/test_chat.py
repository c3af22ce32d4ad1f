"""ChatEngine / Conversation on tiny random models (both prompt formats): streaming, text-only
turns, a stop that ends the worker thread, errors as status, and turn 2 reusing the image
encoding and the KV cache while matching a from-scratch greedy run."""

import threading
import time

import numpy as np
import pytest
import torch
from dragonfly_test_assets import tiny_random_model, tokenizer_for
from PIL import Image

from dragonfly_med.chat import WORKER_NAME, ChatEngine, SamplingParams

FORMATS = ["chatml", "llama3-dragonfly"]


@pytest.fixture(scope="module", params=FORMATS)
def engine(request):
    tokenizer = tokenizer_for(request.param)
    if tokenizer is None:
        pytest.skip("Llama-3.1 tokenizer unavailable (npm or registry unreachable)")
    model, processor = tiny_random_model(tokenizer, request.param)
    return ChatEngine(model, processor, model_id=f"random-{request.param}")


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 200, 3), dtype=np.uint8))


class VisionSpy:
    """Counts calls of the vision tower."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.image_encoder.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def no_worker_alive() -> bool:
    return not any(t.name == WORKER_NAME and t.is_alive() for t in threading.enumerate())


def from_scratch(engine, image, prompt_ids, max_new_tokens):
    """Greedy generate on the whole prompt with fresh image encoding and no cache."""
    model = engine.model
    pixel = engine.processor.image_processor(image)
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel["pixel_values"],
                         num_crops=pixel["num_crops"], max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=engine.eos_token_ids, pad_token_id=engine.processor.pad_token_id)  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


def test_stream_yields_growing_answer(engine, image):
    conv = engine.new_conversation(image)
    chunks = list(conv.stream("What is shown?", SamplingParams(max_new_tokens=6)))
    assert chunks and all(b.startswith(a) for a, b in zip(chunks, chunks[1:], strict=False))
    stats = conv.last_stats
    assert stats.status == "ok" and stats.error is None
    assert stats.new_tokens == 6 and stats.ttft_s > 0 and stats.tokens_per_s > 0
    assert conv.history == [("What is shown?", chunks[-1].strip())]
    assert no_worker_alive()


def test_turn_two_reuses_image_and_cache_and_equals_from_scratch(engine, image):
    params = SamplingParams(max_new_tokens=8)
    conv = engine.new_conversation(image)
    list(conv.stream("Describe the image.", params))
    assert conv.last_generated_ids == from_scratch(engine, image, conv.last_prompt_ids, 8)
    with VisionSpy(engine.model) as spy:
        list(conv.stream("And the colours?", params))
        assert spy.calls == 0
    stats = conv.last_stats
    assert stats.status == "ok"
    assert stats.reused_tokens >= len(conv.last_prompt_ids) - 40  # only the new turn was fed
    assert stats.reused_tokens > engine.processor.image_processor.plan(image).budget.image_positions
    assert conv.last_generated_ids == from_scratch(engine, image, conv.last_prompt_ids, 8)


def test_regenerate_reuses_cache_and_is_deterministic_when_greedy(engine, image):
    conv = engine.new_conversation(image)
    params = SamplingParams(max_new_tokens=5)
    list(conv.stream("First?", params))
    first = conv.history[-1]
    with VisionSpy(engine.model) as spy:
        list(conv.regenerate(params))
        assert spy.calls == 0
    assert conv.history == [first] and conv.last_stats.status == "ok"
    assert conv.last_stats.reused_tokens > 0


def test_text_only_conversation(engine):
    conv = engine.new_conversation(None)
    with VisionSpy(engine.model) as spy:
        list(conv.stream("Hello?", SamplingParams(max_new_tokens=4)))
        list(conv.stream("Again?", SamplingParams(max_new_tokens=4)))
        assert spy.calls == 0
    assert conv.last_stats.status == "ok" and len(conv.history) == 2
    assert engine.processor.image_token_id not in conv.token_ids


def test_stop_event_really_stops_the_worker(engine, image):
    conv = engine.new_conversation(image)
    stop = threading.Event()
    chunks = []
    for text in conv.stream("Talk for a long time.", SamplingParams(max_new_tokens=2000), stop):
        chunks.append(text)
        if len(chunks) == 1:
            assert not no_worker_alive()  # the check below is not vacuous
        if len(chunks) == 3:
            stop.set()
    assert conv.last_stats.status == "stopped"
    assert conv.last_stats.new_tokens < 50
    assert no_worker_alive()
    # the stopped answer is kept and closed, so the conversation goes on
    list(conv.stream("Next?", SamplingParams(max_new_tokens=3)))
    assert conv.last_stats.status == "ok" and len(conv.history) == 2


def test_closing_the_stream_stops_the_worker(engine, image):
    conv = engine.new_conversation(image)
    stream = conv.stream("Go on.", SamplingParams(max_new_tokens=2000))
    next(stream)
    stream.close()
    deadline = time.time() + 10
    while not no_worker_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert no_worker_alive()
    assert not engine.lock.locked()


def test_errors_become_status_not_exceptions(engine, image, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    conv = engine.new_conversation(image)
    monkeypatch.setattr(engine.model, "generate", broken)
    assert list(conv.stream("Q?", SamplingParams(max_new_tokens=3))) == []
    assert conv.last_stats.status == "error" and "out of memory" in conv.last_stats.error
    assert conv.history == [] and not engine.lock.locked()
    monkeypatch.undo()
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0).generate_kwargs()
    list(conv.stream("Q?", SamplingParams(max_new_tokens=2)))
    assert conv.last_stats.status == "ok"


def test_sampling_and_one_shot_answer(engine, image):
    assert isinstance(engine.answer(image, "Q?", SamplingParams(max_new_tokens=3)), str)
    torch.manual_seed(0)
    conv = engine.new_conversation(image)
    list(conv.stream("Q?", SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=3)))
    assert conv.last_stats.status == "ok"


def test_preview_and_concurrent_users(engine, image):
    plan, crops = engine.preview(image)
    assert len(crops) == plan.num_crops == 41
    results = {}

    def user(k):
        results[k] = engine.answer(image, f"Question {k}?", SamplingParams(max_new_tokens=4))

    threads = [threading.Thread(target=user, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 3
    assert results[1] == engine.answer(image, "Question 1?", SamplingParams(max_new_tokens=4))


@pytest.mark.slow
def test_real_tiny_default_two_turns():
    """The embedded default end to end: ChatML prompt, eos <|im_end|>, turn 2 from the cache."""
    engine = ChatEngine.load("tiny")
    assert engine.processor.prompt_format == "chatml"
    assert engine.eos_token_ids == engine.processor.tokenizer.convert_tokens_to_ids(["<|im_end|>"])
    conv = engine.new_conversation(Image.new("RGB", (300, 200), (200, 30, 30)))
    list(conv.stream("What colour is this image?", SamplingParams(max_new_tokens=4)))
    assert conv.last_stats.status == "ok" and conv.history[0][1]
    with VisionSpy(engine.model) as spy:
        list(conv.stream("Are you sure?", SamplingParams(max_new_tokens=4)))
        assert spy.calls == 0
    assert conv.last_stats.status == "ok" and conv.last_stats.reused_tokens > 250


def test_cpu_threads_apply_to_the_worker_only(engine, image, monkeypatch):
    seen = []
    handle = engine.model.image_encoder.register_forward_hook(lambda *a: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(engine, "cpu_threads", 1)
    before = torch.get_num_threads()
    try:
        list(engine.new_conversation(image).stream("Q?", SamplingParams(max_new_tokens=2)))
    finally:
        handle.remove()
    assert seen == [1]  # the image is encoded in the worker, under the engine's thread count
    assert torch.get_num_threads() == before


def test_default_cpu_threads(monkeypatch):
    from dragonfly_med.chat import default_cpu_threads

    class OnCpu:
        device = torch.device("cpu")

    monkeypatch.setenv("DRAGONFLY_CPU_THREADS", "3")
    assert default_cpu_threads(OnCpu()) == 3
    monkeypatch.delenv("DRAGONFLY_CPU_THREADS")
    assert default_cpu_threads(OnCpu()) >= 1

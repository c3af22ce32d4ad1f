"""Chat engine: one model shared by every user, multi-turn conversations with streaming and stop.

Why the pieces are shaped this way:
- `generate` runs in a worker thread and streams through a `TextIteratorStreamer` with a timeout,
  so a dead worker never hangs the caller; a `StoppingCriteria` watching a `threading.Event` makes
  Stop end the worker itself (closing the Python generator alone would leave it running).
- A conversation encodes its image ONCE (`model.encode_images`) and keeps the KV cache of
  everything said so far, with the exact token ids it covers. A follow-up turn appends only its
  new tokens; the cache is cropped back to the longest prefix it still matches, so regenerate
  and stopped answers reuse it too. Turn 2 neither runs the vision tower nor re-reads the prompt.
- One lock serialises generation: one model in memory serves many users, one at a time.
- Failures become `TurnStats(status="error", error=...)`, never an exception out of `stream`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.cache_utils import DynamicCache

from dragonfly_med.model.geometry import CropPlan

STREAM_POLL_S = 0.25  # how often the consumer checks that the worker is still alive
WORKER_NAME = "dragonfly-generate"


@dataclass
class SamplingParams:
    """Decoding settings; temperature 0 means greedy (the released inference setting)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256

    def generate_kwargs(self) -> dict[str, Any]:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }


@dataclass
class TurnStats:
    """What one answer cost. `tokens_per_s` is the decode rate after the first token."""

    ttft_s: float | None = None
    tokens_per_s: float | None = None
    new_tokens: int = 0
    status: str = "ok"  # "ok" | "stopped" | "error"
    error: str | None = None
    total_s: float = 0.0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens served from the KV cache


class _EventStop(StoppingCriteria):
    """Ends generation as soon as the event is set (checked after every token)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _TimedStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that also records when each new token arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.token_times.extend([time.perf_counter()] * value.numel())
        super().put(value)


class ChatEngine:
    """A loaded model + processor that hands out conversations. Thread-safe."""

    def __init__(
        self, model: Any, processor: Any, model_id: str = "model", cpu_threads: int | None = None
    ) -> None:
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.lock = threading.Lock()
        self.cpu_threads = cpu_threads if cpu_threads is not None else default_cpu_threads(model)

    @classmethod
    def load(cls, name: str = "tiny", cpu_threads: int | None = None, **kwargs: Any) -> ChatEngine:
        """`loading.load_model(name, **kwargs)` (load_in_4bit, load_in_8bit, dtype, device_map)."""
        from dragonfly_med.checkpoints.loading import load_model

        model, processor = load_model(name, **kwargs)
        return cls(model, processor, model_id=str(name), cpu_threads=cpu_threads)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = list(self.processor.eos_token_ids)
        for extra in getattr(self.model.config, "eos_token_ids", None) or []:
            if extra not in ids:
                ids.append(int(extra))
        return ids

    def preview(self, image: Image.Image) -> tuple[CropPlan, list[Image.Image]]:
        """The crop plan and the crops in model order, without touching the model."""
        return self.processor.image_processor.crop_images(image)

    def new_conversation(self, image: Image.Image | None = None) -> Conversation:
        return Conversation(self, image)

    def answer(
        self, image: Image.Image | None, question: str, params: SamplingParams | None = None
    ) -> str:
        """One-shot answer (evaluation). Raises RuntimeError if generation failed."""
        conv = self.new_conversation(image)
        for _ in conv.stream(question, params or SamplingParams()):
            pass
        if conv.last_stats.status == "error":
            raise RuntimeError(conv.last_stats.error)
        return conv.history[-1][1]


class Conversation:
    """A multi-turn chat about at most one image (given at the start, as released)."""

    def __init__(self, engine: ChatEngine, image: Image.Image | None = None) -> None:
        self.engine = engine
        self.image = image
        self.plan: CropPlan | None = (
            engine.processor.image_processor.plan(image) if image is not None else None
        )
        self.history: list[tuple[str, str]] = []
        self.last_stats = TurnStats()
        self._image_embeds: list[torch.Tensor] | None = None
        self._ids: list[int] = []  # every token of the conversation so far, answers included
        self._turn_starts: list[int] = []  # len(self._ids) before each turn
        self._cache: DynamicCache | None = None
        self._cache_ids: list[int] = []  # the tokens the cache holds, in order
        self._image_end = 0  # prompt index just past the image block (0: no image)
        self.last_prompt_ids: list[int] = []  # what the last turn was conditioned on
        self.last_generated_ids: list[int] = []  # what it generated (eos included if reached)

    # ----------------------------------------------------------------- public

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def image_embeds(self) -> list[torch.Tensor] | None:
        """The image's visual embeddings once a turn has encoded them (None before, or without
        an image): what `dragonfly_med.relevance` differentiates, never recomputed here."""
        return self._image_embeds

    def stream(
        self,
        question: str,
        params: SamplingParams | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[str]:
        """Yield the answer so far while it is generated; `last_stats` says how it ended."""
        params = params or SamplingParams()
        stop_event = stop_event or threading.Event()
        self.last_stats = TurnStats()
        start = time.perf_counter()
        with self.engine.lock:
            try:
                prompt = self._prompt_ids(question)
                yield from self._generate(question, prompt, params, stop_event, start)
            except GeneratorExit:  # the consumer closed the stream: the worker is already stopped
                stop_event.set()
                self.last_stats.status = "stopped"
                raise
            except Exception as err:  # reported, never raised: the UI shows it
                self.last_stats.status, self.last_stats.error = (
                    "error",
                    f"{type(err).__name__}: {err}",
                )
            finally:
                self.last_stats.total_s = time.perf_counter() - start

    def regenerate(
        self, params: SamplingParams | None = None, stop_event: threading.Event | None = None
    ) -> Iterator[str]:
        """Drop the last answer and stream a new one for the same question."""
        if not self.history:
            self.last_stats = TurnStats(
                status="error", error="nothing to regenerate: the conversation is empty"
            )
            return iter(())
        question, _ = self.history.pop()
        del self._ids[self._turn_starts.pop() :]
        return self.stream(question, params, stop_event)

    # ----------------------------------------------------------------- internals

    def _prompt_ids(self, question: str) -> list[int]:
        """The whole conversation's ids through this turn's assistant header."""
        processor = self.engine.processor
        if self._ids:
            return self._ids + processor.turn_ids(question)
        sample = processor.build_prompt_ids([(question, None)], self.plan)
        self._image_end = sample.image_span[1]
        return sample.input_ids

    def _encoded_image(self) -> list[torch.Tensor] | None:
        """The image's visual embeddings, computed once per conversation."""
        if self.image is None:
            return None
        if self._image_embeds is None:
            model = self.engine.model
            pixel = self.engine.processor.image_processor(self.image)
            with torch.inference_mode():
                self._image_embeds = model.encode_images(
                    pixel["pixel_values"].to(model.device), pixel["num_crops"]
                )
        return self._image_embeds

    def _reusable_cache(self, prompt: list[int]) -> tuple[DynamicCache | None, int]:
        """The cache cropped to the longest prefix it shares with `prompt`, leaving at least one
        prompt token to feed (it yields the first logits). A prefix that ends inside the image
        block is not reused: the visual embeddings are merged for whole blocks only."""
        cache, keep = self._cache, 0
        if cache is not None:
            limit = min(len(self._cache_ids), len(prompt) - 1, cache.get_seq_length())
            while keep < limit and self._cache_ids[keep] == prompt[keep]:
                keep += 1
        if cache is None or keep == 0 or keep < self._image_end:
            return None, 0
        excess = cache.get_seq_length() - keep
        if excess > 0:
            cache.crop(-excess)
        return cache, keep

    def _generate(
        self,
        question: str,
        prompt: list[int],
        params: SamplingParams,
        stop_event: threading.Event,
        start: float,
    ) -> Iterator[str]:
        engine, model = self.engine, self.engine.model
        cache, reused = self._reusable_cache(prompt)
        self._cache = None  # invalid until this turn completes
        streamer = _TimedStreamer(
            engine.processor.tokenizer,
            skip_prompt=True,
            skip_special_tokens=True,
            timeout=STREAM_POLL_S,
        )
        input_ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            image_embeds=None,  # set by the worker when the cache does not hold the image yet
            cache=cache,
            use_cache=True,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_EventStop(stop_event)]),
            eos_token_id=engine.eos_token_ids,
            pad_token_id=engine.processor.pad_token_id,
            return_dict_in_generate=True,
            **params.generate_kwargs(),
        )
        result: dict[str, Any] = {}
        worker = threading.Thread(
            target=_run_turn,
            args=(self, reused == 0 and self.image is not None, kwargs, result, streamer),
            name=WORKER_NAME,
            daemon=True,
        )
        worker.start()
        text, finished = "", False
        try:
            while True:
                try:
                    chunk = next(streamer)
                except StopIteration:
                    break
                except queue.Empty:
                    if not worker.is_alive():
                        break
                    continue
                if chunk:
                    text += chunk
                    yield text
            finished = True
        finally:
            if not finished:  # consumer left early: stop the worker before releasing the lock
                stop_event.set()
            worker.join()
        self._finish_turn(question, prompt, reused, result, streamer, stop_event, start)

    def _finish_turn(
        self,
        question: str,
        prompt: list[int],
        reused: int,
        result: dict,
        streamer: _TimedStreamer,
        stop_event: threading.Event,
        start: float,
    ) -> None:
        stats = self.last_stats
        stats.prompt_tokens, stats.reused_tokens = len(prompt), reused
        if "error" in result:
            stats.status, stats.error = "error", result["error"]
            return
        output = result["output"]
        generated = output.sequences[0, len(prompt) :].tolist()
        self.last_prompt_ids, self.last_generated_ids = list(prompt), generated
        eos = self.engine.eos_token_ids
        answer_ids = generated[:-1] if generated and generated[-1] in eos else generated
        times = streamer.token_times
        stats.new_tokens = len(generated)
        stats.ttft_s = times[0] - start if times else None
        if len(times) > 1 and times[-1] > times[0]:
            stats.tokens_per_s = (len(times) - 1) / (times[-1] - times[0])
        ended_by_eos = bool(generated) and generated[-1] in eos
        stats.status = "stopped" if (stop_event.is_set() and not ended_by_eos) else "ok"
        processor = self.engine.processor
        answer = processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        # The conversation continues from exactly these tokens: what was generated, closed.
        self._turn_starts.append(len(self._ids))
        self._ids = prompt + answer_ids + [eos[0]] + processor.answer_close_ids()
        self.history.append((question, answer))
        cache = getattr(output, "cache", None)
        if cache is not None:
            self._cache = cache
            self._cache_ids = (prompt + generated)[: cache.get_seq_length()]


def default_cpu_threads(model: Any) -> int | None:
    """Intra-op threads for a model on the CPU: `$DRAGONFLY_CPU_THREADS`, else half the cores.

    Measured on the shared 2-core machine: with 2 threads a 41-crop turn of the tiny model took
    3-3.7 s to its first token, with 1 thread 2.1-2.2 s (OpenMP threads spin against the other
    processes; a 135M LLM's decode gains nothing from them). Half the cores also leaves the app's
    own threads room. Set per worker thread, so the rest of the process is untouched."""
    device = getattr(model, "device", None)
    if device is not None and torch.device(device).type != "cpu":
        return None
    if os.environ.get("DRAGONFLY_CPU_THREADS"):
        return max(1, int(os.environ["DRAGONFLY_CPU_THREADS"]))
    return max(1, (os.cpu_count() or 2) // 2)


def _run_turn(
    conversation: Conversation,
    needs_image: bool,
    kwargs: dict,
    result: dict,
    streamer: TextIteratorStreamer,
) -> None:
    """Worker: encode the image if this turn needs it, generate, keep the output or the error,
    and always end the stream. All of a turn's compute runs here, under the engine's threads."""
    try:
        threads = conversation.engine.cpu_threads
        if threads:
            torch.set_num_threads(threads)  # OpenMP: applies to this worker thread only
        with torch.inference_mode():
            if needs_image:
                kwargs["image_embeds"] = conversation._encoded_image()
            result["output"] = conversation.engine.model.generate(**kwargs)
    except Exception as err:  # handed to the consumer as status "error"
        result["error"] = f"{type(err).__name__}: {err}"
        streamer.end()

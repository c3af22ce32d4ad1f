"""Where the model looked: a relevance share per crop for one answer (gradient x input).

Method (docs/relevance.md says why, and what it does not mean): the answer's log-probability,
`sum_t log p(answer_t | prompt, answer_<t)` under teacher forcing, is differentiated with
respect to the visual embeddings the language model received (the projector's output, one row
per visual token). Each token's relevance is `|grad . embedding|`, the first-order estimate of
how much the log-probability changes if that token's embedding were zeroed, either way; a
crop's relevance is the sum over its tokens, and shares are relevances divided by their total.

Why not attention: attention weights say where a head read, not whether what it read changed
the answer (a token can draw weight and carry a value the next layers ignore); a gradient is a
statement about the answer itself.

What it shows on the tiny model (test_relevance.py, docs/relevance.md): the low view, 49 of
the 209 visual tokens and the whole image, takes most of the share; the last crops of the image
block take more than their content explains (position); a bright label raises its own high
crop's share several times over the same crop of a blank image.

Cost: one forward and one backward over the conversation so far, inputs' gradients only (no
weight gradients), logits only at the answer's positions. It runs after the answer streamed,
under the engine's lock, so it never delays that answer's first token; a question asked (by
anyone) while it runs waits for it, about 2 s on the shared 2-core machine (docs/benchmarks.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dragonfly_med.model.geometry import Crop, CropPlan

METHOD = "gradient x input"
# The answer's first tokens are scored, the rest not: keeps the cost bounded on long answers
# (the sequence differentiated grows with every scored token).
MAX_ANSWER_TOKENS = 64


@dataclass(frozen=True)
class CropShare:
    """One crop of the plan and its share of the answer's relevance (shares sum to 1)."""

    crop: Crop
    share: float

    def to_dict(self) -> dict:
        """The crop object of `/load_image`'s plan, plus its share."""
        c = self.crop
        return {"level": c.level, "col": c.col, "row": c.row, "box": [round(v, 2) for v in c.box],
                "share": round(self.share, 6)}


@dataclass(frozen=True)
class Relevance:
    """The shares of one answer, in model order (low, medium row-major, high row-major)."""

    crops: tuple[CropShare, ...]
    method: str = METHOD
    answer_tokens: int = 0  # answer tokens scored
    seconds: float = 0.0  # wall time of the computation (lock wait excluded)

    def to_dict(self) -> dict:
        """The `/explain` answer."""
        return {"method": self.method, "crops": [c.to_dict() for c in self.crops]}

    def shares(self) -> list[float]:
        """The shares alone, in model order (what tests and the overlay compare)."""
        return [c.share for c in self.crops]


@dataclass
class TurnSnapshot:
    """What relevance needs of a finished turn, copied when it ends (the conversation moves on)."""

    plan: CropPlan
    image_embeds: Sequence[torch.Tensor]
    prompt_ids: list[int]
    generated_ids: list[int]


def snapshot(conversation: Any) -> TurnSnapshot | None:
    """The last turn of a `Conversation`, or None when it has nothing to explain (no image, no
    answer tokens, or the turn failed). Call it only after a turn's stream ran to its end: a
    stream closed early leaves the previous turn's ids in place."""
    embeds = getattr(conversation, "image_embeds", None)
    if conversation.plan is None or embeds is None or not conversation.last_generated_ids:
        return None
    if conversation.last_stats.status == "error":
        return None
    return TurnSnapshot(conversation.plan, list(embeds), list(conversation.last_prompt_ids),
                        list(conversation.last_generated_ids))


def crop_relevance(model: Any, turn: TurnSnapshot, max_answer_tokens: int = MAX_ANSWER_TOKENS) -> Relevance:
    """Shares per crop for one answer, from one forward + backward pass (see module docstring)."""
    start = time.perf_counter()
    scores = token_scores(model, turn, max_answer_tokens)
    per_crop = torch.stack([part.sum() for part in torch.split(scores, list(turn.plan.crop_tokens))])
    total = float(per_crop.sum())
    shares = (per_crop / total).tolist() if total > 0 else [1.0 / len(per_crop)] * len(per_crop)
    return Relevance(
        crops=tuple(CropShare(crop, share) for crop, share in zip(turn.plan.crops, shares, strict=True)),
        answer_tokens=min(len(turn.generated_ids), max_answer_tokens),
        seconds=time.perf_counter() - start,
    )


def token_scores(model: Any, turn: TurnSnapshot, max_answer_tokens: int) -> torch.Tensor:
    """|gradient x input| of the answer's log-probability, one value per visual token."""
    if sum(turn.plan.crop_tokens) != sum(e.shape[0] for e in turn.image_embeds):
        raise ValueError("the image embeddings do not match the crop plan")
    answer = turn.generated_ids[:max_answer_tokens]
    ids = torch.tensor([turn.prompt_ids + answer[:-1]], dtype=torch.long, device=model.device)
    # a normal (not inference-mode) leaf: the chat engine encoded the image under inference_mode
    visual = torch.cat([e.detach() for e in turn.image_embeds]).clone().requires_grad_(True)
    with torch.enable_grad():
        text = model.get_input_embeddings()(ids).detach()
        inputs = model.merge_image_embeds(ids, text, [visual])
        logits = model.language_model(inputs_embeds=inputs, use_cache=False, logits_to_keep=len(answer)).logits
        target = torch.tensor(answer, dtype=torch.long, device=logits.device)
        log_prob = logits[0].float().log_softmax(-1).gather(-1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(log_prob, visual)
    return (grad.float() * visual.detach().float()).sum(-1).abs().cpu()


def explain(engine: Any, turn: TurnSnapshot, max_answer_tokens: int = MAX_ANSWER_TOKENS) -> Relevance:
    """`crop_relevance` under the engine's lock (one model, one computation at a time) with the
    engine's CPU thread count, as its generation worker uses."""
    with engine.lock:
        threads = getattr(engine, "cpu_threads", None)
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            return crop_relevance(engine.model, turn, max_answer_tokens)
        finally:
            if threads:
                torch.set_num_threads(previous)


class Explainer:
    """Computes one answer's relevance in a background thread: the answer's event ends at once
    and whoever needs the shares (the page, `/explain`, the log) waits on `result`."""

    def __init__(self, engine: Any, turn: TurnSnapshot, on_done: Callable[[Relevance], None] | None = None) -> None:
        self.engine, self.turn, self.on_done = engine, turn, on_done
        self.relevance: Relevance | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dragonfly-explain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.relevance = explain(self.engine, self.turn)
            if self.on_done is not None:
                self.on_done(self.relevance)
        except Exception as err:  # reported by result(), never raised in the thread
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self.turn = None  # the embeddings are not needed any more: a long session keeps many explainers
            self._done.set()

    def result(self, timeout: float | None = None) -> Relevance | None:
        """The relevance once computed (None if it failed or is not ready within timeout)."""
        self._done.wait(timeout)
        return self.relevance

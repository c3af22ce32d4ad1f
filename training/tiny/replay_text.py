"""Replay data: the packaged LLM's own answers to general requests, mixed into the adapter stages.

Adapters trained only on short answers about images teach the LLM to answer everything in a few
words ("Count from 1 to 10." -> "1"). The paper keeps the LLM's zero-shot ability by interleaving
text-only data (OpenHermes and MathInstruct, appendix A); offline there is no such set, so the LLM
as packaged writes one: greedy answers to a fixed list of general requests (self-distillation).
Some requests are asked again with an unrelated training image attached, answered the same way:
an image in the chat must not stop the model from counting or explaining when that is the task.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from training.engine.records import write_jsonl

COUNTS = (5, 10, 12, 15, 20, 25, 30, 40, 50, 100)
TERMS = (
    "a CT scan", "an MRI scan", "an ultrasound examination", "a chest X-ray", "a fundus photograph",
    "histology", "immunohistochemistry", "a Hounsfield unit", "a contrast agent", "a lung window",
    "the axial plane", "the sagittal plane", "the coronal plane", "a microaneurysm", "diabetic retinopathy",
    "an echocardiogram", "Doppler ultrasound", "a radiology report", "a DICOM file", "a biopsy",
    "the radiological convention for left and right", "a pixel", "image resolution", "a brain atlas",
    "a PET scan", "mammography", "a bone fracture", "pneumonia", "a kidney stone", "the retina",
    "the optic disc", "a hematoxylin and eosin stain", "the cerebral cortex", "the hippocampus",
    "a stroke", "a tumour", "an artefact in an image", "a radiologist", "a pathologist",
)
TOPICS = (
    "the ocean", "autumn", "a hospital at night", "friendship", "a cup of coffee", "the moon",
    "a busy train station", "learning to cook", "rain on a window", "a mountain walk",
)
TASKS = (
    "Give three tips for staying healthy.", "List five fruits.", "Name the seven days of the week.",
    "Name the twelve months of the year.", "List the planets of the solar system in order.",
    "What is 12 plus 30?", "What is 7 times 8?", "What is the capital of France?",
    "Translate 'good morning' into French and Spanish.", "Spell the word 'radiology' backwards.",
    "Explain how to boil an egg, step by step.", "Give me three ideas for a birthday present.",
    "Summarise the plot of Little Red Riding Hood.", "What are the primary colours?",
    "Hello! How are you today?", "Thank you for your help.", "Tell me a short joke.",
    "Write a Python function that adds two numbers.", "Explain what a computer is to a child.",
    "Why is the sky blue?", "How many hours are in a week?", "Give three synonyms for 'big'.",
    "Write a haiku about winter.", "What is the boiling point of water in Celsius?",
    "Give me a recipe for pancakes.", "What should I pack for a weekend trip?",
    "Explain the difference between a virus and a bacterium.", "How does the heart pump blood?",
    "What are the four seasons?", "Describe a cat in three sentences.", "What is photosynthesis?",
    "How can I improve my sleep?", "Write a short thank-you note to a nurse.",
    "What is the difference between weather and climate?", "Give three examples of mammals.",
    "Explain what a fever is.", "How do vaccines work?", "Name three parts of a flower.",
)


def replay_prompts() -> list[str]:
    """The general requests, in a fixed order: counting, lists, explanations, writing, chat."""
    prompts = [f"Count from 1 to {n}." for n in COUNTS]
    prompts += [f"List the numbers from {a} to {a + n}, separated by commas." for a, n in ((3, 12), (20, 15), (50, 10), (100, 20))]
    prompts += [f"What is {term}? Explain in a few sentences." for term in TERMS]
    prompts += [f"Write a short poem about {topic}." for topic in TOPICS]
    prompts += [f"Write a short story about {topic}." for topic in TOPICS[:5]]
    return prompts + list(TASKS)


@torch.inference_mode()
def generate_answers(model_dir: Path, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers of the model in `model_dir` (no image), batched with left padding; "" for
    an answer cut off by `max_new_tokens` (training on it would teach stopping mid-sentence)."""
    from dragonfly_med.checkpoints.loading import load_model

    model, processor = load_model(model_dir, dtype=torch.float32, device_map="cpu")
    pad, ends = processor.pad_token_id, set(processor.eos_token_ids)
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="replay answers", unit="batch"):
        batch = processor.collate([processor.build_prompt_ids(p) for p in prompts[start : start + batch_size]])
        width = batch["input_ids"].shape[1]
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=processor.eos_token_ids,
            pad_token_id=pad,
        )
        for row in out[:, width:].tolist():
            finished = any(token in ends for token in row)
            answers.append(processor.decode(row, skip_special_tokens=True).strip() if finished else "")
    return answers


def replay_records(prompts: list[str], answers: list[str], images: list[str], seed: int, with_image: float = 0.3) -> list[dict]:
    """LLaVA-style records: every answered request text-only, a seeded share again with an image."""
    rng = random.Random(f"{seed}-replay")
    records = []
    for index, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        if not answer:
            continue
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
        records.append({"id": f"replay-{index}", "conversations": turns, "source": "replay"})
        if images and rng.random() < with_image:
            image_turns = [{"from": "human", "value": f"<image>\n{prompt}"}, turns[1]]
            records.append({"id": f"replay-{index}-image", "image": rng.choice(images), "conversations": image_turns, "source": "replay"})
    return records


def training_images(data_dir: Path) -> list[str]:
    """The distinct images of the training split, relative to the data folder."""
    from training.engine.records import read_records

    return sorted({str(r.image) for r in read_records(data_dir / "train.jsonl") if r.image is not None})


def ensure_replay(data_dir: Path, model_dir: Path, max_new_tokens: int = 256, limit: int | None = None, seed: int = 0) -> Path:
    """Write the replay data into `data_dir` once (~2.5 minutes on this CPU); reuse it afterwards.
    The file is named by its size and seed, so that a smoke run's replay never stands in for a
    full one, nor one seed's choice of images for another's."""
    prompts = replay_prompts()[:limit]
    target = data_dir / f"replay-{len(prompts)}x{max_new_tokens}-seed{seed}.jsonl"
    if target.is_file():
        return target
    answers = generate_answers(model_dir, prompts, max_new_tokens)
    records = replay_records(prompts, answers, training_images(data_dir), seed)
    if not records:
        raise ValueError(f"no replay answer ended within {max_new_tokens} tokens: raise the limit")
    partial = target.with_suffix(".partial")
    write_jsonl(partial, records)
    partial.replace(target)
    print(f"[replay] {len(records)} records from {len(prompts)} requests -> {target}")
    return target

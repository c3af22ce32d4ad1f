"""A run folder: what a training stage leaves on disk, and how it resumes.

    RUN/final/            the model `load_model` / `--model` reads (LoRA merged in; the chained
                          PEFT adapter in final/adapter/)
    RUN/checkpoints/step-N/   accelerate state + trainer_state.json (step, plan fingerprint);
                          the latest KEEP_CHECKPOINTS are kept
    RUN/metrics.jsonl, RUN/loss_curve.png

Kept apart from the training loop (trainer.py) so the loop reads as the loop.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from training.engine.mixture import Mixture, plan_fingerprint
from training.engine.recipe import Recipe

FINAL_DIR = "final"  # the model `load_model` / `--model` reads, inside the run folder
CHECKPOINTS_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2


@dataclass
class RunPaths:
    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def final(self) -> Path:
        return self.root / FINAL_DIR

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob("step-*/trainer_state.json"))
        return found[-1].parent if found else None


def save_final(accelerator, model, processor, recipe: Recipe, paths: RunPaths, steps: int, init: str) -> None:
    """final/ is a plain model folder (LoRA merged in) that `load_model` reads. The LLM's change
    since the tiny default also goes to final/adapter/, as one PEFT LoRA adapter (earlier stages'
    adapters, read from the init folder, followed by this stage's; dragonfly_med/checkpoints/lora.py says
    how), while it is one: a stage that trains the LLM's full weights ends the chain."""
    from dragonfly_med.checkpoints.lora import (
        ADAPTER_DIR,
        adapters,
        concat_adapters,
        load_adapters,
        merge_lora,
        save_adapters,
    )

    unwrapped = accelerator.unwrap_model(model)
    previous = Path(init) / ADAPTER_DIR
    chain = load_adapters(previous) if previous.is_dir() and (recipe.lora_rank or not recipe.tune.llm) else None
    if recipe.lora_rank:
        chain = concat_adapters(chain or {}, adapters(unwrapped.language_model))
        merge_lora(unwrapped.language_model)
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards
    if accelerator.is_main_process:
        if paths.final.exists():
            shutil.rmtree(paths.final)
        unwrapped.save_pretrained(paths.final, state_dict=state_dict)
        processor.save_pretrained(paths.final)
        if chain:
            save_adapters(chain, paths.final / ADAPTER_DIR)
        (paths.final / "README.md").write_text(
            f"# Dragonfly-Med, trained with recipe `{recipe.name}`\n\n{recipe.description}\n\n"
            f"Started from `{recipe.init_from}`; {steps} optimizer steps of {recipe.global_batch_size} samples; "
            f"trained: {', '.join(k for k, v in vars(recipe.tune).items() if v)}.\n"
            f"Load with `load_model('{paths.final}')` or `--model {paths.final}`.\n\nResearch model, not for diagnostic use.\n"
        )
    accelerator.wait_for_everyone()


def plot_losses(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if len(rows) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(out.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def save_checkpoint(accelerator, paths: RunPaths, step: int, mixture: Mixture) -> None:
    """Model, optimizer, scheduler and RNG states (accelerate) + the step; older ones pruned."""
    target = paths.checkpoint(step)
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        (target / "trainer_state.json").write_text(json.dumps({"step": step, "plan": plan_fingerprint(mixture)}))
        for old in sorted(paths.checkpoints.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()

"""The training engine: one recipe stage on accelerate, from one CPU process to DeepSpeed ZeRO.

    python -m training run --recipe tiny-med-stage1 --max-steps 2 --output runs/x
    accelerate launch --config_file training/accelerate/zero2.yaml -m training run --recipe med-stage2

The whole run is planned before the first step (training/engine/mixture.py): every optimizer step's global
batch is fixed by the seed, and each process takes its slice of it. A run's position is then a
step index, so a checkpoint (model, optimizer, scheduler, RNG states, step) resumes exactly: the
resumed run computes the same losses as an uninterrupted one. What we do differently from the
release (reference/released-checkpoint.md), on purpose:
- loss on the assistant's answers only (the processor's labels), never on prompts, headers,
  the image block or padding;
- truncation to the recipe's max_seq_length (not half of it), from the end, never into the
  image block, and counted in the metrics;
- the scheduler counts optimizer steps, so gradient accumulation does not shorten the schedule;
- no validation pass that re-reads training batches; use `python -m training eval` on held-out data.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from training.engine.convert_adapters import require_converted
from training.engine.feature_cache import FeatureCache, default_cache_dir
from training.engine.mixture import Mixture, build_mixture, plan_fingerprint
from training.engine.recipe import Recipe, Tune, load_recipe
from training.engine.run_folder import RunPaths, plot_losses, save_checkpoint, save_final

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "num_crops")


# ---- what is trained -------------------------------------------------------------------------


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The three parts a recipe's `tune` names, by their released module names."""
    return {"projector": model.vision_embed_tokens, "vision_encoder": model.image_encoder, "llm": model.language_model}


def apply_tune(model: nn.Module, tune: Tune, lora_rank: int = 0, lora_alpha: float = 16.0) -> dict[str, int]:
    """Freeze what the recipe does not train. A frozen vision tower also goes to eval mode, so
    its batch-norm statistics (EfficientNet) stay as loaded; a frozen LLM stays in train mode
    (Llama has no dropout), because gradients still flow through it to the visual embeddings
    and gradient checkpointing only acts on modules in train mode. With `lora_rank`, a trained
    LLM gets PEFT LoRA adapters and its own weights stay frozen. Returns trainable counts."""
    from dragonfly_med.checkpoints.lora import add_lora

    model.train()
    counts = {}
    for name, part in model_parts(model).items():
        trainable = getattr(tune, name)
        part.requires_grad_(trainable)
        if not trainable and name == "vision_encoder":
            part.eval()
        if trainable and name == "llm" and lora_rank:
            add_lora(part, lora_rank, lora_alpha)  # freezes the LLM's own weights
        # ZeRO-3 partitions parameters while loading: ds_numel is the full size
        counts[name] = sum(getattr(p, "ds_numel", p.numel()) for p in part.parameters() if p.requires_grad)
    return counts


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.modules.batchnorm._BatchNorm) or "Norm" in type(module).__name__


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices, none on biases, norms and embeddings (tied
    weights are counted once, in the group of the module that owns them first)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = name.endswith("bias") or param.ndim < 2 or is_norm(module) or isinstance(module, nn.Embedding)
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- data ------------------------------------------------------------------------------------


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


class MicroBatches(Dataset):
    """This process's micro-batches, in order, from `start_step` on: item i is micro-batch
    i % accum of step start_step + i // accum, tokenised with the model's processor. With
    `pixels=False` (tower features come from the cache) the crops are planned, not rendered."""

    def __init__(
        self, mixture: Mixture, processor, recipe: Recipe, rank: int, world: int, start_step: int, total_steps: int, pixels: bool = True
    ):
        self.mixture, self.processor, self.recipe = mixture, processor, recipe
        self.rank, self.start_step, self.total_steps = rank, start_step, total_steps
        self.pixels = pixels
        self.accum = accumulation_steps(recipe, world)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum

    def image_paths(self) -> list[Path]:
        """The distinct images of this process's micro-batches, in order of first use."""
        per_rank = self.recipe.micro_batch_size * self.accum
        seen: dict[Path, None] = {}
        for step in self.mixture.steps[self.start_step : self.total_steps]:
            for d, i in step.refs[self.rank * per_rank : (self.rank + 1) * per_rank]:
                image = self.mixture.datasets[d][i].image
                if image is not None:
                    seen.setdefault(image)
        return list(seen)

    def __getitem__(self, index: int) -> dict:
        step, micro = self.start_step + index // self.accum, index % self.accum
        size = self.recipe.micro_batch_size
        per_rank = size * self.accum
        refs = self.mixture.steps[step].refs[self.rank * per_rank : (self.rank + 1) * per_rank][micro * size : (micro + 1) * size]
        records = [self.mixture.datasets[d][i] for d, i in refs]
        batch = self.processor(
            images=[load_image(r.image) if r.image is not None else None for r in records],
            conversation=[r.turns for r in records],
            return_labels=True,
            max_length=self.recipe.max_seq_length,
            return_pixels=self.pixels,
        )
        out = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        out["num_truncated"] = batch.num_truncated
        out["image_paths"] = [str(r.image) for r in records if r.image is not None]
        return out


def accumulation_steps(recipe: Recipe, world: int) -> int:
    per_step = recipe.micro_batch_size * world
    if recipe.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {recipe.global_batch_size} is not a multiple of micro_batch_size "
            f"{recipe.micro_batch_size} x {world} processes; change micro_batch_size or the process count"
        )
    return recipe.global_batch_size // per_step


def missing_images(mixture: Mixture, limit: int = 10) -> list[str]:
    missing = []
    for records in mixture.datasets:
        missing += [str(r.image) for r in records if r.image is not None and not r.image.exists()]
    return missing[:limit]


# ---- one step --------------------------------------------------------------------------------


def answer_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the batch's answer tokens (labels != -100), the same value as the
    LLM's own loss, but the vocabulary projection runs only at the positions that predict an
    answer token (a few of ~300 on the tiny model: the lm_head is a fifth of its FLOPs). A
    batch whose answers were all truncated away contributes a zero loss that still has a graph
    (DeepSpeed and DDP expect every process to run backward)."""
    targets = batch["labels"][:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS + ("image_embeds",) and k != "labels"}
    if keep.numel() == 0:
        output = model(**inputs, use_cache=False, logits_to_keep=1)
        return output.logits.sum() * 0.0
    output = model(**inputs, use_cache=False, logits_to_keep=keep)
    return nn.functional.cross_entropy(output.logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=-100)


# ---- the run ---------------------------------------------------------------------------------


def resolve_init(recipe: Recipe) -> str:
    """`init_from`, or `init_fallback` when init_from is a path that does not exist yet (the
    tiny recipes start from the tiny default on a fresh clone)."""
    init = recipe.init_from
    if recipe.init_fallback and not Path(init).exists():
        print(f"[training] {init} does not exist yet: starting from {recipe.init_fallback} (init_fallback)")
        return recipe.init_fallback
    return init


def load_for_training(name: str):
    """(model, processor) like `load_model`, but in fp32 on the CPU and without a device map:
    `accelerator.prepare` places it (each process on its own GPU), and ZeRO-3 refuses device maps."""
    from dragonfly_med.checkpoints.loading import load_processor, resolve_model_dir
    from dragonfly_med.checkpoints.released import is_released_layout, load_released
    from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration

    directory = resolve_model_dir(name)
    if is_released_layout(directory):
        model = load_released(directory, dtype=torch.float32)
    else:
        model = DragonflyForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    return model, load_processor(directory, model.config)


def cpu_runs_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX). Elsewhere torch emulates
    it: on an AVX2-only EPYC a tiny stage-1 step took 84 s under bf16 autocast, 3.1 s in fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def fast_precision() -> str:
    """`mixed_precision` for the CPU-budgeted runs (reproduce-tiny, the ablation, bench-step): bf16
    where the CPU runs it natively (a step ~20% faster), else "auto" (fp32 on CPU, bf16 on CUDA)."""
    return "bf16" if cpu_runs_bf16() else "auto"


def mixed_precision(recipe: Recipe) -> str:
    """bf16 where the hardware supports it ("auto"): CUDA with bf16; fp32 on CPU."""
    if recipe.mixed_precision != "auto":
        return recipe.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_scheduler(recipe: Recipe, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if recipe.lr_scheduler == "constant" else recipe.lr_scheduler
    warmup = math.ceil(recipe.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def configure_deepspeed(accelerator, recipe: Recipe, accum: int) -> None:
    """Give DeepSpeed the batch geometry it cannot infer (we pass it no dataloader)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = recipe.micro_batch_size
    config["gradient_accumulation_steps"] = accum
    config["train_batch_size"] = recipe.global_batch_size
    config["gradient_clipping"] = recipe.max_grad_norm


def train(recipe: Recipe, output: Path | None = None, resume: str | None = None) -> dict:
    """Run one stage; returns a summary (steps, final loss, paths)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    paths = RunPaths(Path(output) if output else recipe.run_dir)
    accelerator = Accelerator(mixed_precision=mixed_precision(recipe), gradient_accumulation_steps=1)
    accum = accumulation_steps(recipe, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = accum
    configure_deepspeed(accelerator, recipe, accum)
    set_seed(recipe.seed)

    mixture = build_mixture(recipe)
    missing = missing_images(mixture)
    if missing:
        raise FileNotFoundError(f"missing images (first {len(missing)}): {missing}; run `python -m training check`")
    total_steps = min(len(mixture.steps), recipe.max_steps or len(mixture.steps))

    init = resolve_init(recipe)
    require_converted(Path(init))  # before training: its adapters would be dropped from the chain
    zero3 = zero_stage(accelerator) == 3
    if zero3 and recipe.lora_rank:
        raise ValueError("LoRA (lora_rank > 0) is not supported with ZeRO-3; use ZeRO-2 or train full weights")
    model, processor = load_for_training(init)
    trainable = apply_tune(model, recipe.tune, recipe.lora_rank, recipe.lora_alpha)
    features = FeatureCache(default_cache_dir()) if caches_tower(recipe, zero3) else None
    if recipe.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.learning_rate, betas=recipe.adam_betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = make_scheduler(recipe, optimizer, total_steps)  # on ZeRO-3's regrouped parameters
    accelerator.register_for_checkpointing(scheduler)

    start_step = 0
    checkpoint = paths.latest_checkpoint() if resume == "auto" else (Path(resume) if resume else None)
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if state["plan"] != plan_fingerprint(mixture):
            raise ValueError(f"{checkpoint} was planned for other data or settings; cannot resume exactly")
        accelerator.load_state(str(checkpoint))
        start_step = state["step"]

    if accelerator.is_main_process:
        paths.root.mkdir(parents=True, exist_ok=True)
        (paths.root / "recipe.json").write_text(json.dumps(recipe.to_dict() | {"resolved_init": init, "plan": mixture.summary()}, indent=2))
        kept = []
        if paths.metrics.exists():  # drop metrics of steps the resumed run will redo
            kept = [line for line in paths.metrics.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
        paths.metrics.write_text("".join(line + "\n" for line in kept))

    data = MicroBatches(
        mixture, processor, recipe, accelerator.process_index, accelerator.num_processes, start_step, total_steps, pixels=features is None
    )
    if features is not None:
        fill_feature_cache(features, accelerator.unwrap_model(model), processor, data.image_paths(), accelerator.is_main_process)
    loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=recipe.num_workers)
    progress = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_main_process, desc=recipe.name)
    micro_losses, truncated, total_truncated, started = [], 0, 0, time.time()
    losses: dict[int, float] = {}
    for index, batch in enumerate(loader):
        step = start_step + index // accum
        truncated += batch.pop("num_truncated")
        image_paths = batch.pop("image_paths")
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}  # the loader is not prepared
        with accelerator.accumulate(model):
            with accelerator.autocast():
                if features is not None and image_paths:
                    batch["image_embeds"] = cached_embeds(features, accelerator.unwrap_model(model), processor, image_paths)
                loss = answer_loss(model, batch)
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        micro_losses.append(loss.detach().float())
        if not accelerator.sync_gradients:
            continue
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
        step_truncated = int(accelerator.reduce(torch.tensor(truncated, device=accelerator.device), reduction="sum").item())
        micro_losses, truncated, total_truncated = [], 0, total_truncated + step_truncated
        losses[step + 1] = step_loss
        row = {
            "step": step + 1,
            "loss": step_loss,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "stream": mixture.names[s] if (s := mixture.steps[step].stream) >= 0 else "main",
            "truncated": step_truncated,
            "elapsed_s": round(time.time() - started, 2),
        }
        if accelerator.is_main_process:
            with paths.metrics.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            progress.update(1)
        if (step + 1) % recipe.save_steps == 0 and step + 1 < total_steps:
            save_checkpoint(accelerator, paths, step + 1, mixture)
    progress.close()

    save_final(accelerator, model, processor, recipe, paths, total_steps, init)
    if accelerator.is_main_process and paths.metrics.read_text().strip():
        plot_losses(paths.metrics, paths.root / "loss_curve.png")
    return {
        "recipe": recipe.name,
        "steps": total_steps,
        "resumed_from": start_step,
        "truncated_samples": total_truncated,
        "trainable_parameters": trainable,
        "losses": losses,
        "final": str(paths.final),
        "metrics": str(paths.metrics),
    }


def caches_tower(recipe: Recipe, zero3: bool) -> bool:
    """Whether the frozen tower's features come from the on-disk cache (recipe key
    `cache_vision_features`). ZeRO-3 partitions the tower's weights, so it runs in forward only."""
    wanted = recipe.cache_vision_features
    if wanted == "auto":
        wanted = not torch.cuda.is_available()
    return bool(wanted) and not recipe.tune.vision_encoder and not zero3


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def fill_feature_cache(cache: FeatureCache, model: nn.Module, processor, image_paths: list[Path], show: bool) -> None:
    """Run the frozen tower once on every image this process will see (a progress bar; images
    cached by an earlier stage, variant or evaluation are skipped)."""
    from tqdm import tqdm

    for path in tqdm(image_paths, desc="tower features", disable=not show):
        cache.ensure(model, processor.image_processor, path)


def cached_embeds(cache: FeatureCache, model: nn.Module, processor, image_paths: list[str]) -> list[torch.Tensor]:
    """Each image's visual embeddings from its cached tower features, through the (trained)
    projector, with the crops of the processor's levels: what `encode_images` gives from pixels."""
    levels = processor.image_processor.geometry_obj.levels
    return [cache.embeds(model, cache.features(model, processor.image_processor, p), levels) for p in image_paths]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe name under training/recipes/ or a YAML path")
    parser.add_argument("--output", type=Path, default=None, help="run folder (default runs/RECIPE); the model goes to OUTPUT/final")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (the schedule spans N)")
    parser.add_argument("--resume", default=None, help="'auto' (latest checkpoint of the run folder) or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value, e.g. learning_rate=1e-5 data_root=/data")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"max_steps={args.max_steps}"] if args.max_steps else [])
    summary = train(load_recipe(args.recipe, overrides), args.output, args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"} | {"last_loss": list(summary["losses"].values())[-1:]}))
    return 0

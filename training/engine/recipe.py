"""Recipes: one YAML file per training stage, resolved into a validated `Recipe`.

A recipe says where a stage starts (`init_from`), what it trains (`tune`), on which data
(`datasets`) and how (optimisation). The YAML files under training/recipes/ carry the paper's
numbers (tables 8 and 12) with comments citing them; everything the paper leaves open is
labelled there as our choice. `show-recipe` prints the resolved recipe so a run can be checked
against the paper before it starts; `key=value` overrides (dotted for nesting, list items by
index: `datasets.0.path=...`) apply on top, values parsed as YAML.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class Tune:
    """Which of the three parts receive gradients; the rest is frozen."""

    projector: bool
    vision_encoder: bool
    llm: bool


@dataclass
class DatasetSpec:
    """One entry of a data mixture.

    `path` is a LLaVA-style JSON/JSONL file, a release-layout parquet file or folder, or
    `builtin:NAME` (the small generated data of the tiny recipes); relative paths are taken from
    the recipe's `data_root`. Per epoch the entry contributes `count` samples, or `weight` x its
    size (1.0 = every record once, 0.5 = a seeded half, 2.0 = twice). A text-only stream with
    `interleave_every: N` is not part of the epoch: one extra micro-batch of it joins every N-th
    optimizer step (the release's stage 2 mixes OpenHermes every 10 steps, math every 50).
    `turns_per_image: N` joins single questions about the same image into conversations of up
    to N turns (LLaVA's layout): the image's tokens are paid for once per conversation.
    """

    name: str
    path: str
    image_root: str | None = None
    weight: float | None = None
    count: int | None = None
    interleave_every: int | None = None
    max_per_image: int | None = None
    turns_per_image: int | None = None
    exclude_sources: list[str] = field(default_factory=list)
    domain: str = "general"

    def validate(self) -> None:
        if self.interleave_every is not None:
            if self.interleave_every < 2:  # 1 would leave no step for the main data
                raise ValueError(f"dataset {self.name}: interleave_every must be >= 2")
            return
        if (self.weight is None) == (self.count is None):
            raise ValueError(f"dataset {self.name}: give exactly one of weight or count")
        if (self.weight is not None and self.weight <= 0) or (self.count is not None and self.count <= 0):
            raise ValueError(f"dataset {self.name}: weight/count must be positive")
        if self.turns_per_image is not None and self.turns_per_image < 2:
            raise ValueError(f"dataset {self.name}: turns_per_image must be >= 2 (1 is the data as it is)")
        if self.domain not in ("general", "biomedical"):
            raise ValueError(f"dataset {self.name}: domain must be general or biomedical")


@dataclass
class Recipe:
    """A fully resolved training stage."""

    name: str
    description: str
    init_from: str
    tune: Tune
    datasets: list[DatasetSpec]
    global_batch_size: int
    learning_rate: float
    init_fallback: str | None = None
    data_root: str = "data"
    micro_batch_size: int = 1
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.01
    max_seq_length: int = 4096
    epochs: float = 1.0
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 42
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = True
    # tune.llm with lora_rank > 0 trains low-rank adapters of the LLM's projections instead of
    # its full weights (merged into final/, and saved alone as the PEFT adapter final/adapter/)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    # a frozen vision tower's features are computed once per image and kept on disk; "auto":
    # on machines without CUDA (where the tower costs as much as the step), not on GPUs (where
    # it is cheap and a large dataset's features would fill the disk)
    cache_vision_features: bool | str = "auto"
    save_steps: int = 1000
    logging_steps: int = 10
    max_steps: int | None = None
    num_workers: int = 2
    output_dir: str | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if not (self.tune.projector or self.tune.vision_encoder or self.tune.llm):
            raise ValueError("tune: at least one of projector, vision_encoder, llm must be true")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.learning_rate <= 0 or self.epochs <= 0 or self.max_seq_length <= 0:
            raise ValueError("learning_rate, epochs and max_seq_length must be positive")
        if self.cache_vision_features not in (True, False, "auto"):
            raise ValueError("cache_vision_features must be true, false or auto")
        if self.lora_rank < 0 or (self.lora_rank and not self.tune.llm):
            raise ValueError("lora_rank must be >= 0, and LoRA needs tune.llm: true")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise ValueError("mixed_precision must be auto, bf16, fp16 or no")
        if not any(d.interleave_every is None for d in self.datasets):
            raise ValueError("a recipe needs at least one dataset that is not interleaved")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique: {names}")
        for spec in self.datasets:
            spec.validate()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data


def recipe_path(name_or_path: str) -> Path:
    """A recipe is a name under training/recipes/ or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(available_recipes())
        raise FileNotFoundError(f"no recipe {name_or_path!r}; known: {known}")
    return path


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` (value read as YAML) to the raw recipe dict in place."""
    if "=" not in assignment:
        raise ValueError(f"override must look like key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def from_dict(data: dict) -> Recipe:
    known = {f.name for f in fields(Recipe)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown recipe keys: {sorted(unknown)}")
    data = dict(data)
    data["tune"] = Tune(**data["tune"])
    spec_keys = {f.name for f in fields(DatasetSpec)}
    specs = []
    for entry in data["datasets"]:
        bad = set(entry) - spec_keys
        if bad:
            raise ValueError(f"dataset {entry.get('name')}: unknown keys {sorted(bad)}")
        specs.append(DatasetSpec(**entry))
    data["datasets"] = specs
    if "adam_betas" in data:
        data["adam_betas"] = tuple(data["adam_betas"])
    for key in ("learning_rate", "warmup_ratio", "epochs", "weight_decay", "max_grad_norm"):
        if key in data:
            data[key] = float(data[key])  # YAML 1.1 reads "2e-5" as a string
    if data.get("mixed_precision") is False:
        data["mixed_precision"] = "no"  # and `mixed_precision: no` as false
    recipe = Recipe(**data)
    recipe.validate()
    return recipe


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply `key=value` overrides and validate the result."""
    data = yaml.safe_load(recipe_path(name_or_path).read_text())
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(data)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help=f"name ({', '.join(available_recipes())}) or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-5")
    parser.add_argument("--json", action="store_true", help="print JSON instead of YAML")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    data = recipe.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0

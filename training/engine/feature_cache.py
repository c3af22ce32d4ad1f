"""Vision-tower features of whole images, computed once and kept on disk.

Why: on a 2-core CPU the tower costs ~1 s per 41-crop tiny image, as much as the LLM step, and
in every tiny recipe we run it is frozen, so its output for an image never changes. Training
stages, the ablation's variants and seeds, and the evaluation's model and baselines then share
one pass over the images.

What is stored: the features of every crop of the FULL plan (low + medium + high), the medium
and high crops already mean-pooled to `pooled_grid` (pooling is linear and precedes the
projector, so this is exact). `embeds` selects the crops of any level subset and applies a
model's projector, which is what `encode_images` computes from pixels. Entries are keyed by a
fingerprint of the tower's weights and of the crop geometry, plus the image file's path, size
and modification time; a trained tower or an edited image gets a new entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image


def tower_fingerprint(model) -> str:
    """Identifies the vision tower's weights (a trained tower must not reuse cached features)."""
    h = hashlib.sha1()
    for name, tensor in sorted(model.image_encoder.state_dict().items()):
        if tensor.is_floating_point():
            h.update(f"{name}:{float(tensor.double().sum()):.6e}".encode())
    return h.hexdigest()[:12]


def full_levels(image_processor):
    """The same image processor with every level on (the ablation's processors drop some)."""
    from dragonfly_med.model.geometry import LEVELS
    from dragonfly_med.model.image_processing_dragonfly import DragonflyImageProcessor

    geometry = image_processor.geometry_obj
    if geometry.levels == LEVELS:
        return image_processor
    return DragonflyImageProcessor(
        geometry=replace(geometry, levels=LEVELS),
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
        rescale_factor=image_processor.rescale_factor,
    )


def default_cache_dir() -> Path:
    from dragonfly_med.checkpoints.tiny import cache_root

    return cache_root() / "tower-features"


@dataclass(frozen=True)
class ImageFeatures:
    """The full plan's tower output for one image: low crop tokens [T, C] and pooled
    medium-then-high crops [M + H, t, C]; `n_medium` splits the two. `image_size` is the
    image's (width, height), from which a processor re-plans the crops of its own levels."""

    low: torch.Tensor
    pooled: torch.Tensor
    n_medium: int
    image_size: tuple[int, int]


class FeatureCache:
    """Tower features per image: on disk when `directory` is given (read back per use, ~1 ms,
    so a large dataset does not fill the RAM), else in memory (evaluation of a few hundred
    images without a cache folder)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self.memory: dict[tuple[str, str], ImageFeatures] = {}
        self._keys: dict[int, str] = {}

    def model_key(self, model, image_processor) -> str:
        """Tower weights + geometry + normalisation: what the features depend on."""
        if id(model) not in self._keys:
            processor = full_levels(image_processor)
            settings = json.dumps(
                [repr(processor.geometry_obj), processor.image_mean, processor.image_std, processor.rescale_factor]
            )
            self._keys[id(model)] = f"{tower_fingerprint(model)}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}"
        return self._keys[id(model)]

    def _file(self, key: str, image_path: Path) -> Path | None:
        if self.directory is None:
            return None
        stat = image_path.stat()
        ident = f"{image_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return self.directory / key / f"{hashlib.sha1(ident.encode()).hexdigest()}.safetensors"

    def features(self, model, image_processor, image_path: str | Path) -> ImageFeatures:
        """The cached features of an image, computing (and storing) them on a miss."""
        image_path = Path(image_path)
        key = self.model_key(model, image_processor)
        memory_key = (key, str(image_path))
        if memory_key in self.memory:
            return self.memory[memory_key]
        file = self._file(key, image_path)
        if file is None:
            self.memory[memory_key] = compute_features(model, image_processor, image_path)
            return self.memory[memory_key]
        if file.is_file():
            return read_features(file)
        found = compute_features(model, image_processor, image_path)
        write_features(found, file)
        return found

    def ensure(self, model, image_processor, image_path: str | Path) -> None:
        """Compute and store an image's features unless they are stored already (a fill pass
        over a dataset need not read back what an earlier stage or variant wrote)."""
        file = self._file(self.model_key(model, image_processor), Path(image_path))
        if file is None or not file.is_file():
            self.features(model, image_processor, image_path)

    @staticmethod
    def embeds(model, found: ImageFeatures, levels: tuple[str, ...]) -> torch.Tensor:
        """Visual embeddings for the crops of `levels`, in model order (low, medium, high),
        through the model's projector; differentiable with respect to the projector."""
        parts = [found.pooled[: found.n_medium]] if "medium" in levels else []
        if "high" in levels:
            parts.append(found.pooled[found.n_medium :])
        projector = model.vision_embed_tokens
        device = projector.weight.device
        out = [projector(found.low.to(device))]
        if parts:
            out.append(projector(torch.cat(parts).to(device)).flatten(0, 1))
        return torch.cat(out)


def compute_features(model, image_processor, image_path: Path) -> ImageFeatures:
    full = full_levels(image_processor)
    with Image.open(image_path) as image:
        image = image.convert("RGB")
    plan = full.plan(image)
    pixel = full(image)
    with torch.no_grad():
        (features,) = model._tower_features(pixel["pixel_values"], pixel["num_crops"])
        low, pooled = features[0], model.pool_crops(features[1:])
    n_medium = plan.medium_grid[0] * plan.medium_grid[1]
    return ImageFeatures(low.float().cpu().clone(), pooled.float().cpu().clone(), n_medium, tuple(plan.image_size))


def write_features(found: ImageFeatures, file: Path) -> None:
    """Atomic write: concurrent processes may fill the same cache."""
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
    os.close(handle)
    try:
        save_file({"low": found.low, "pooled": found.pooled}, temporary, metadata={"n_medium": str(found.n_medium), "image_size": json.dumps(list(found.image_size))})
        os.replace(temporary, file)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def read_features(file: Path) -> ImageFeatures:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        meta = handle.metadata()
        size = tuple(json.loads(meta["image_size"]))
        return ImageFeatures(handle.get_tensor("low"), handle.get_tensor("pooled"), int(meta["n_medium"]), size)

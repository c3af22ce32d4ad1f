"""GPU check for a session lent a GPU (< 5 minutes on one H100/H200, no network needed).

    .venv/bin/python scripts/gpu_check.py            # on the GPU machine
    .venv/bin/python scripts/gpu_check.py --smoke    # same code path, toy sizes, CPU ok

Builds, with random weights, the released shapes: CLIP ViT-L/14 @ 336 at full depth (24 layers)
+ the 1024 -> 4096 projector + a Llama-3.1-8B-shaped LLM at reduced depth (default 4 of 32
layers), and measures:
- vision encode of 41 crops (bf16), pooling before vs after the projector;
- prefill of a released-size prompt (2098 image positions + text) and decode rate;
- GPU memory in bf16 and with the LLM in 4-bit nf4 (bitsandbytes, saved then reloaded), each
  extrapolated to 32 layers from the measured per-layer size.
Prints one JSON summary at the end (also written to $OUT/gpu_check.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import CLIPVisionConfig, LlamaConfig  # noqa: E402

from dragonfly_med.checkpoints.loading import quantization_config  # noqa: E402
from dragonfly_med.model.configuration_dragonfly import DragonflyConfig, released_clip_vision_config  # noqa: E402
from dragonfly_med.model.geometry import plan_crops  # noqa: E402
from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration  # noqa: E402

FULL_LLM_LAYERS = 32
IMAGE, SEP, BOS, EOS = 128002, 128003, 128000, 128009


def llama31_8b(layers: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                       rms_norm_eps=1e-5)  # fmt: skip


def smoke_configs(layers: int) -> tuple[CLIPVisionConfig, LlamaConfig]:
    vision = CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128256)  # fmt: skip
    return vision, text


def build(args) -> DragonflyForConditionalGeneration:
    vision, text = (
        smoke_configs(args.llm_layers)
        if args.smoke
        else (released_clip_vision_config(), llama31_8b(args.llm_layers))
    )
    geometry = None
    if args.smoke:  # 56 px / 14 = 4x4 patches, pooled to 1x1
        geometry = {"crop_size": 56, "feature_grid": 4, "pooled_grid": 1, "cls_token": True}
    config = DragonflyConfig(vision_config=vision, text_config=text, geometry=geometry, image_token_id=IMAGE,
                             separator_token_id=SEP, eos_token_ids=[EOS])  # fmt: skip
    return DragonflyForConditionalGeneration(config).eval()


def timed(fn, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of fn() after one warm-up, synchronising the GPU."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def layer_bytes(model) -> int:
    layer = model.language_model.model.layers[0]
    return sum(
        t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers())
    )


def prompt_ids(model, text_tokens: int = 30) -> torch.Tensor:
    plan = plan_crops(1920, 1080, model.config.get_geometry())
    block = []
    for tokens in plan.crop_tokens:
        block += [IMAGE] * tokens + [SEP]
    text = [BOS] + list(range(1000, 1000 + text_tokens))
    return torch.tensor([block + text]), plan


def measure(model, device: torch.device, dtype: torch.dtype, label: str, report: dict) -> None:
    """Encode, prefill and decode timings + memory for a model already on `device`."""
    geometry = model.config.get_geometry()
    ids, plan = prompt_ids(model)
    ids = ids.to(device)
    pixel = torch.randn(
        plan.num_crops, 3, geometry.crop_size, geometry.crop_size, device=device, dtype=dtype
    )
    with torch.inference_mode():
        first = timed(lambda: model.encode_images(pixel, [plan.num_crops]), device)
        after = timed(lambda: model.encode_images_pool_after(pixel, [plan.num_crops]), device)
        embeds = model.encode_images(pixel, [plan.num_crops])
        prefill = timed(
            lambda: model(input_ids=ids, image_embeds=embeds, use_cache=True, logits_to_keep=1),
            device,
            repeats=3,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), image_embeds=embeds, max_new_tokens=32,
                             min_new_tokens=32, do_sample=False, pad_token_id=0)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        generate_s = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    report[label] = {
        "crops": plan.num_crops,
        "prompt_positions": int(ids.shape[1]),
        "encode_41_crops_ms": round(first * 1e3, 2),
        "encode_pool_after_ms": round(after * 1e3, 2),
        "pool_first_speedup": round(after / first, 3),
        "prefill_ms": round(prefill * 1e3, 2),
        "generate_32_s": round(generate_s, 3),
        "decode_tokens_per_s_approx": round(new / max(generate_s - prefill, 1e-9), 1),
    }
    if device.type == "cuda":
        report[label]["peak_gib_generate"] = gib(torch.cuda.max_memory_allocated())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, runs on CPU in seconds")
    parser.add_argument("--skip-4bit", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                    "llm_layers": args.llm_layers, "smoke": args.smoke}  # fmt: skip
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build(args).to(dtype)
    per_layer = layer_bytes(model)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        report["bf16_gib_measured"] = gib(allocated)
        report["bf16_gib_full_depth_est"] = gib(
            allocated + (FULL_LLM_LAYERS - args.llm_layers) * per_layer
        )
    report["bf16_layer_gib"] = gib(per_layer)
    measure(model, device, dtype, "bf16" if device.type == "cuda" else "fp32", report)
    print(json.dumps(report), flush=True)

    if not args.skip_4bit and device.type == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            model.to("cpu").save_pretrained(tmp)
            del model
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            quant = DragonflyForConditionalGeneration.from_pretrained(
                tmp,
                dtype=torch.bfloat16,
                device_map="cuda",
                quantization_config=quantization_config(load_in_4bit=True),
            ).eval()
            torch.cuda.synchronize()
            allocated = torch.cuda.memory_allocated()
            per_layer_4 = layer_bytes(quant)
            report["nf4_gib_measured"] = gib(allocated)
            report["nf4_layer_gib"] = gib(per_layer_4)
            report["nf4_gib_full_depth_est"] = gib(
                allocated + (FULL_LLM_LAYERS - args.llm_layers) * per_layer_4
            )
            measure(quant, device, torch.bfloat16, "nf4", report)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

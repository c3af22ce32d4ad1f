"""LoRA through PEFT: a fresh adapter changes nothing, training moves only the adapters, merged and
saved adapters reproduce the trained model's outputs, chained stages concatenate exactly into one
PEFT adapter, adapters that do not fit refuse to merge, old lora.safetensors files convert
exactly, and the shipped adapter loads with `PeftModel.from_pretrained` onto the packaged LLM."""

from __future__ import annotations

import json

import pytest
import torch
from offline_med_fake import random_model
from peft import PeftModel, PeftModelForCausalLM
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from dragonfly_med.checkpoints.lora import (
    CONFIG_FILE,
    KEY_PREFIX,
    WEIGHTS_FILE,
    adapters,
    add_lora,
    concat_adapters,
    load_adapters,
    merge_adapter_folder,
    merge_lora,
    save_adapters,
)
from training.engine.convert_adapters import LEGACY_FILE, convert, require_converted


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def train_adapters(module: nn.Module, steps: int = 5, seed: int = 1) -> None:
    torch.manual_seed(seed)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(steps):
        x = torch.randn(16, 6)
        module(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_fresh_adapter_changes_nothing_and_only_adapters_train():
    base, wrapped = mlp(), mlp()
    names = add_lora(wrapped, rank=2, alpha=4, targets=("0", "2"))
    assert names == ["0", "2"] and isinstance(wrapped[0], LoraLayer)
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == {
        f"{i}.lora_{ab}.default.weight" for i in (0, 2) for ab in "AB"
    }
    x = torch.randn(3, 6)
    torch.testing.assert_close(wrapped(x), base(x))  # B starts at zero
    frozen = [p.clone() for p in (wrapped[0].base_layer.weight, wrapped[2].base_layer.weight)]
    train_adapters(wrapped)
    torch.testing.assert_close(wrapped[0].base_layer.weight, frozen[0])
    torch.testing.assert_close(wrapped[2].base_layer.weight, frozen[1])
    assert wrapped[0].lora_B["default"].weight.abs().sum() > 0


def test_merged_and_saved_adapters_reproduce_the_trained_outputs(tmp_path):
    trained = mlp()
    add_lora(trained, rank=3, alpha=6, targets=("0", "2"))
    train_adapters(trained)
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = trained(x)
    folder = save_adapters(adapters(trained), tmp_path / "adapter", task_type=None)
    assert {p.name for p in folder.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    fresh = mlp()
    assert merge_adapter_folder(fresh, folder) == 2
    assert type(fresh[0]) is nn.Linear
    merge_lora(trained)
    assert type(trained[0]) is nn.Linear and not hasattr(trained, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(trained(x), expected)
        torch.testing.assert_close(fresh(x), expected)


def test_chained_stages_concatenate_along_the_rank_into_one_peft_adapter(tmp_path):
    model = mlp()
    add_lora(model, rank=2, alpha=2, targets=("0", "2"))
    train_adapters(model, seed=1)
    first = adapters(model)
    merge_lora(model)
    add_lora(model, rank=2, alpha=6, targets=("0", "2"))  # another scale: folded in per stage
    train_adapters(model, seed=2)
    chain = concat_adapters(first, adapters(model))
    merge_lora(model)
    assert chain["0"][0].shape == (4, 6) and chain["0"][1].shape == (8, 4)
    folder = save_adapters(chain, tmp_path / "adapter", task_type=None)
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 4)
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = model(x)
        unmerged = PeftModel.from_pretrained(mlp(), str(folder))  # PEFT's own forward, scale 1
        torch.testing.assert_close(unmerged(x), expected)
        rebuilt = mlp()
        merge_adapter_folder(rebuilt, folder)
        torch.testing.assert_close(rebuilt(x), expected)
    for name, (a, b) in load_adapters(folder).items():
        torch.testing.assert_close(a, chain[name][0])
        torch.testing.assert_close(b, chain[name][1])


def test_adapters_that_do_not_fit_are_refused(tmp_path):
    wrong_shape = save_adapters({"0": (torch.zeros(2, 5), torch.zeros(8, 2))}, tmp_path / "shape", task_type=None)
    with pytest.raises(RuntimeError, match="size mismatch"):
        merge_adapter_folder(mlp(), wrong_shape)
    def fits():
        return torch.zeros(2, 6), torch.zeros(8, 2)

    no_layer = save_adapters({"0": fits(), "extra.0": fits()}, tmp_path / "layer", task_type=None)
    model = mlp()
    with pytest.raises(ValueError, match="find no layer"):
        merge_adapter_folder(model, no_layer)
    assert type(model[0]) is nn.Linear  # left as it was
    with pytest.raises(ValueError, match="one rank"):
        save_adapters({"0": fits(), "2": (torch.zeros(3, 8), torch.zeros(4, 3))}, tmp_path / "ranks", task_type=None)
    with pytest.raises(ValueError, match="not found in the base model"):
        add_lora(mlp(), rank=2, alpha=2, targets=("q_proj",))


def test_every_llama_projection_gets_an_adapter():
    model, _ = random_model()
    names = add_lora(model.language_model, rank=2, alpha=4)
    layers = model.config.text_config.num_hidden_layers
    assert len(names) == 7 * layers
    assert {n.rsplit(".", 1)[-1] for n in names} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip


def test_old_adapter_files_convert_exactly_and_are_required_converted(tmp_path):
    """The hand-written format (scale folded into B, names relative to the LLM) renames into a
    PEFT folder bit for bit, in its own dtype, that merges as W + B @ A; a model folder with only
    the old file is refused as a chain's start, with the command that converts it."""
    llm = random_model()[0].language_model
    packaged = {k: v.clone() for k, v in llm.state_dict().items()}
    torch.manual_seed(0)
    legacy = {}
    for name, layer in llm.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            legacy[f"{name}.lora_A"] = torch.randn(3, layer.in_features).half()
            legacy[f"{name}.lora_B"] = torch.randn(layer.out_features, 3).half()
    run = tmp_path / "final"
    run.mkdir()
    save_file(legacy, str(run / LEGACY_FILE))
    with pytest.raises(FileNotFoundError, match="convert-adapters"):
        require_converted(run)
    folder = convert(run / LEGACY_FILE, run / "adapter")
    require_converted(run)
    saved = load_file(str(folder / WEIGHTS_FILE))
    assert set(saved) == {f"{KEY_PREFIX}{key}.weight" for key in legacy}
    for key, tensor in legacy.items():
        assert torch.equal(saved[f"{KEY_PREFIX}{key}.weight"], tensor)  # same dtype, same bits
    assert merge_adapter_folder(llm, folder) == len(legacy) // 2
    merged = llm.state_dict()
    for name, weight in packaged.items():
        module = name.removesuffix(".weight")
        if f"{module}.lora_A" in legacy:
            weight = weight + legacy[f"{module}.lora_B"].float() @ legacy[f"{module}.lora_A"].float()
        torch.testing.assert_close(merged[name], weight, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_the_shipped_adapter_loads_with_peft_onto_the_packaged_llm():
    """assets/tiny as any PEFT user would load it: `PeftModel.from_pretrained` on the plain
    packaged SmolLM2 (the LLM of tiny-base) adapts every projection of every layer, and
    `merge_and_unload` gives W + B @ A exactly where the file says, the packaged weights elsewhere."""
    from dragonfly_med.checkpoints.loading import load_model
    from dragonfly_med.checkpoints.tiny import ADAPTERS_ASSET

    llm = load_model("tiny-base", dtype=torch.float32)[0].language_model
    packaged = {k: v.clone() for k, v in llm.state_dict().items()}
    config = json.loads((ADAPTERS_ASSET / CONFIG_FILE).read_text())
    assert config["r"] == config["lora_alpha"] == 32  # two rank-16 stages, scales folded in
    peft_model = PeftModel.from_pretrained(llm, str(ADAPTERS_ASSET))
    assert isinstance(peft_model, PeftModelForCausalLM)
    layers = llm.config.num_hidden_layers
    assert len([m for m in llm.modules() if isinstance(m, LoraLayer)]) == 7 * layers
    merged = peft_model.merge_and_unload().state_dict()
    saved = load_file(str(ADAPTERS_ASSET / WEIGHTS_FILE))
    assert {t.dtype for t in saved.values()} == {torch.float16} and len(saved) == 2 * 7 * layers
    updated = set()
    for key, a in saved.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(KEY_PREFIX).removesuffix(".lora_A.weight") + ".weight"
            b = saved[key.replace(".lora_A.", ".lora_B.")]
            expected = packaged[name] + b.float() @ a.float()
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
            updated.add(name)
    assert set(merged) == set(packaged)
    for name in set(packaged) - updated:
        assert torch.equal(merged[name], packaged[name]), name

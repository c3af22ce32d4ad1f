"""LoRA adapters: a fresh adapter changes nothing, training moves only the adapters, merged and
saved adapters reproduce the trained model's outputs, chained stages concatenate exactly, and
adapters that do not fit refuse to merge."""

from __future__ import annotations

import pytest
import torch
from offline_med_fake import random_model
from torch import nn

from dragonfly_med.lora import (
    LoRALinear,
    adapters,
    add_lora,
    apply_adapters,
    concat_adapters,
    load_adapters,
    merge_lora,
    save_adapters,
)


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
    assert names == ["0", "2"] and isinstance(wrapped[0], LoRALinear)
    x = torch.randn(3, 6)
    torch.testing.assert_close(wrapped(x), base(x))  # B starts at zero
    frozen = [p.clone() for p in (wrapped[0].base.weight, wrapped[2].base.weight)]
    train_adapters(wrapped)
    torch.testing.assert_close(wrapped[0].base.weight, frozen[0])
    torch.testing.assert_close(wrapped[2].base.weight, frozen[1])
    assert wrapped[0].lora_B.abs().sum() > 0


def test_merged_and_saved_adapters_reproduce_the_trained_outputs(tmp_path):
    trained = mlp()
    add_lora(trained, rank=3, alpha=6, targets=("0", "2"))
    train_adapters(trained)
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = trained(x)
    path = save_adapters(adapters(trained), tmp_path / "lora.safetensors")
    fresh = mlp()
    assert apply_adapters(fresh, load_adapters(path)) == 2
    merge_lora(trained)
    assert isinstance(trained[0], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(trained(x), expected)
        torch.testing.assert_close(fresh(x), expected)


def test_chained_stages_concatenate_along_the_rank():
    model = mlp()
    add_lora(model, rank=2, alpha=2, targets=("0", "2"))
    train_adapters(model, seed=1)
    first = adapters(model)
    merge_lora(model)
    add_lora(model, rank=2, alpha=2, targets=("0", "2"))
    train_adapters(model, seed=2)
    chain = concat_adapters(first, adapters(model))
    merge_lora(model)
    assert chain["0.lora_A"].shape == (4, 6) and chain["0.lora_B"].shape == (8, 4)
    rebuilt = mlp()
    apply_adapters(rebuilt, chain)
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_adapters_that_do_not_fit_are_refused():
    wrong = {"0.lora_A": torch.zeros(2, 5), "0.lora_B": torch.zeros(8, 2)}
    with pytest.raises(ValueError, match="does not fit"):
        apply_adapters(mlp(), wrong)
    with pytest.raises(ValueError, match="no linear layer"):
        add_lora(mlp(), rank=2, alpha=2, targets=("q_proj",))


def test_every_llama_projection_gets_an_adapter():
    model, _ = random_model()
    names = add_lora(model.language_model, rank=2, alpha=4)
    layers = model.config.text_config.num_hidden_layers
    assert len(names) == 7 * layers
    assert {n.rsplit(".", 1)[-1] for n in names} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip

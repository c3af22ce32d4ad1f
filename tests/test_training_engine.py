"""The engine: freezing per stage, answer-only loss, truncation, a run that loads back, exact resume.

Most tests use a tiny RANDOM Dragonfly (CLIP 28 px, 2-layer Llama) sharing the tiny default's
tokenizer, so they take seconds; one test trains the real tiny default for 2 steps.
"""

import json
import shutil

import pytest
import torch
from dragonfly_test_assets import smollm2_tokenizer
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig

from dragonfly_med.checkpoints.loading import load_model
from dragonfly_med.checkpoints.tiny import EOS_TOKEN, IMAGE_TOKEN, SEPARATOR_TOKEN
from dragonfly_med.model.configuration_dragonfly import DragonflyConfig
from dragonfly_med.model.geometry import Geometry
from dragonfly_med.model.modeling_dragonfly import DragonflyForConditionalGeneration
from dragonfly_med.model.processing_dragonfly import DragonflyProcessor
from training.engine.mixture import build_mixture
from training.engine.recipe import load_recipe
from training.engine.trainer import (
    MicroBatches,
    answer_loss,
    apply_tune,
    model_parts,
    param_groups,
    train,
)

STAGES = ("general-stage1", "general-stage2", "med-stage1", "med-stage2", "med-stage3")


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory):
    tokenizer = smollm2_tokenizer()
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, SEPARATOR_TOKEN, EOS_TOKEN])
    config = DragonflyConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False),
        geometry=Geometry(crop_size=28, feature_grid=2, pooled_grid=1, cls_token=True, high_scale=1).to_dict(),
        image_token_id=ids[0], separator_token_id=ids[1], eos_token_ids=[ids[2]], prompt_format="chatml",
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("random-dragonfly")
    DragonflyForConditionalGeneration(config).save_pretrained(directory)
    DragonflyProcessor.from_model_config(config, tokenizer).save_pretrained(directory)
    return directory


def first_batch(recipe, processor, device=None):
    batch = MicroBatches(build_mixture(recipe), processor, recipe, rank=0, world=1, start_step=0, total_steps=1)[0]
    batch.pop("num_truncated")
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_trains_exactly_what_its_recipe_says(stage, random_model_dir):
    recipe = load_recipe(stage)
    model, processor = load_model(random_model_dir, dtype=torch.float32)
    apply_tune(model, recipe.tune)
    batch = first_batch(load_recipe(f"tiny-{stage}"), processor, model.device)
    answer_loss(model, batch).backward()
    for name, part in model_parts(model).items():
        tuned = getattr(recipe.tune, name)
        assert all(p.requires_grad == tuned for p in part.parameters()), name
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        if tuned:  # (CLIP's last layer is unused: features come from the penultimate one)
            assert grads and any(g.abs().sum() > 0 for g in grads), name
        else:
            assert not grads, name
    # a frozen tower keeps its batch-norm statistics; the LLM stays in train mode for checkpointing
    assert model.image_encoder.training == recipe.tune.vision_encoder and model.language_model.training


def test_weight_decay_groups(random_model_dir):
    model, _ = load_model(random_model_dir, dtype=torch.float32)
    apply_tune(model, load_recipe("general-stage2").tune)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "vision_embed_tokens.weight" in decayed and "vision_embed_tokens.bias" in exempt
    assert "language_model.model.embed_tokens.weight" in exempt
    assert any("norm" in n for n in exempt) and not any("norm" in n or n.endswith("bias") for n in decayed)
    assert len(decayed) + len(exempt) == sum(p.requires_grad for p in model.parameters())


def test_loss_only_on_answers_of_a_multi_turn_sample(random_model_dir):
    model, processor = load_model(random_model_dir, dtype=torch.float32)
    turns = [("What modality is this?", "A chest X-ray."), ("Any effusion?", "No effusion is seen.")]
    batch = processor(images=[Image.new("RGB", (60, 40), "white"), None], conversation=[turns, [("Hi", "Hello.")]], return_labels=True)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    labels = batch["labels"]
    eos = processor.eos_token_ids[0]
    learned = labels[0][labels[0] != -100].tolist()
    assert processor.tokenizer.decode(learned) == "A chest X-ray.<|im_end|>No effusion is seen.<|im_end|>"
    assert learned.count(eos) == 2
    image_positions = batch["input_ids"][0] == model.config.image_token_id
    assert image_positions.any() and (labels[0][image_positions] == -100).all()
    padding = batch["attention_mask"][1] == 0
    assert padding.any() and (labels[1][padding] == -100).all()  # right padding, never learned
    # the model's loss equals a cross-entropy over exactly these answer tokens
    with torch.no_grad():
        loss = answer_loss(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "num_crops")})
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "num_crops")}).logits
    targets = labels[:, 1:]
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][targets != -100], targets[targets != -100])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_truncation_is_counted_and_keeps_the_image_block(random_model_dir):
    _, processor = load_model(random_model_dir, dtype=torch.float32)
    recipe = load_recipe("tiny-med-stage2", ["max_seq_length=38"])
    batch = MicroBatches(build_mixture(recipe), processor, recipe, 0, 1, 0, 1)[0]
    assert batch["num_truncated"] == 1 and batch["input_ids"].shape[1] == 38
    # the image block survived whole: one placeholder per visual token of the image's plan
    plan = processor.image_processor.plan(Image.open(recipe_image(recipe, 0)).size)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == plan.budget.visual_tokens


def recipe_image(recipe, step):
    mixture = build_mixture(recipe)
    return mixture.records(mixture.steps[step])[0].image


def run(recipe_name, init, out, *overrides, resume=None):
    recipe = load_recipe(recipe_name, [f"init_from={init}", *overrides])
    return train(recipe, out, resume)


def test_run_writes_metrics_plot_and_a_loadable_model(random_model_dir, tmp_path):
    summary = run("tiny-general-stage1", random_model_dir, tmp_path / "run", "max_steps=2")
    assert summary["steps"] == 2 and set(summary["losses"]) == {1, 2} and summary["truncated_samples"] == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    trained, _ = load_model(tmp_path / "run" / "final", dtype=torch.float32)
    initial, _ = load_model(random_model_dir, dtype=torch.float32)
    changed = {n for (n, a), (_, b) in zip(trained.state_dict().items(), initial.state_dict().items(), strict=True) if not torch.equal(a, b)}
    assert changed == {"vision_embed_tokens.weight", "vision_embed_tokens.bias"}  # projector only


def test_resume_reproduces_the_uninterrupted_run(random_model_dir, tmp_path):
    # tiny-general-stage2: everything trained, step 3 is an interleaved text-only step
    full = run("tiny-general-stage2", random_model_dir, tmp_path / "full", "save_steps=2")
    assert full["steps"] == 4
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints", resumed_dir / "checkpoints")
    resumed = run("tiny-general-stage2", random_model_dir, resumed_dir, "save_steps=2", resume="auto")
    assert resumed["resumed_from"] == 2 and set(resumed["losses"]) == {3, 4}
    for step in (3, 4):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=1e-6, abs=1e-7)
    a = load_model(tmp_path / "full" / "final", dtype=torch.float32)[0].state_dict()
    b = load_model(resumed_dir / "final", dtype=torch.float32)[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    rows = [json.loads(x)["stream"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows == ["main", "main", "tiny-text", "main"]


def test_cached_tower_features_train_exactly_like_pixels(random_model_dir, tmp_path):
    """A frozen tower's features come from the on-disk cache: same losses, same projector."""
    common = ("max_steps=3", "tune.vision_encoder=false")
    cached = run("tiny-general-stage1", random_model_dir, tmp_path / "cached", *common, "cache_vision_features=true")
    pixels = run("tiny-general-stage1", random_model_dir, tmp_path / "pixels", *common, "cache_vision_features=false")
    for step, loss in pixels["losses"].items():
        assert cached["losses"][step] == pytest.approx(loss, rel=1e-5)
    a = load_model(tmp_path / "cached" / "final", dtype=torch.float32)[0].vision_embed_tokens.weight
    b = load_model(tmp_path / "pixels" / "final", dtype=torch.float32)[0].vision_embed_tokens.weight
    # on a GPU, cuDNN's TF32 convolutions make the two paths' tower features differ slightly
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 if torch.cuda.is_available() else 1e-6)


def llm_weights(folder):
    return load_model(folder, dtype=torch.float32)[0].language_model


def test_lora_stages_chain_adapters_that_rebuild_the_trained_llm(random_model_dir, tmp_path):
    """LoRA trains adapters, final/ holds the merged LLM, and final/adapter/ (every LoRA stage's
    adapters, chained into one PEFT adapter; carried through stages that leave the LLM alone)
    rebuilds it from the starting LLM: what the tiny assets ship."""
    from dragonfly_med.checkpoints.lora import (
        ADAPTER_DIR,
        CONFIG_FILE,
        load_adapters,
        merge_adapter_folder,
    )

    lora = ("max_steps=2", "tune.vision_encoder=false", "lora_rank=2", "lora_alpha=4", "learning_rate=1e-2")
    summary = run("tiny-med-stage2", random_model_dir, tmp_path / "s2", *lora)
    assert 0 < summary["trainable_parameters"]["llm"] < 10_000  # adapters only
    run("tiny-med-stage3", tmp_path / "s2" / "final", tmp_path / "s3", *lora)
    run("tiny-med-stage1", tmp_path / "s3" / "final", tmp_path / "s4", "max_steps=1", "tune.vision_encoder=false")
    adapter = tmp_path / "s4" / "final" / ADAPTER_DIR
    chain = load_adapters(adapter)
    assert {a.shape[0] for a, _ in chain.values()} == {4}  # 2 stages x rank 2
    config = json.loads((adapter / CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 4)  # the stages' scales are folded into B
    # beside config.json, transformers' from_pretrained would apply it again to the merged LLM
    assert not (tmp_path / "s3" / "final" / CONFIG_FILE).exists()
    trained, rebuilt = llm_weights(tmp_path / "s3" / "final"), llm_weights(random_model_dir)
    initial = llm_weights(random_model_dir).state_dict()
    assert merge_adapter_folder(rebuilt, adapter) == 7 * 2
    changed = 0
    for (name, a), (_, b) in zip(trained.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        changed += not torch.equal(a, initial[name])
    assert changed == 7 * 2  # every projection of both layers moved; embeddings and norms did not


@pytest.mark.slow
def test_tiny_default_trains_two_steps_and_loads(tmp_path, capsys):
    from training.__main__ import main

    out = tmp_path / "tiny-run"
    assert main(["run", "--recipe", "tiny-general-stage1", "--max-steps", "2", "--output", str(out), "global_batch_size=1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    model, processor = load_model(out / "final")  # what `--model DIR/final` loads
    assert model.config.prompt_format == "chatml" and processor.image_token_id == model.config.image_token_id


def test_eval_command_with_a_model(random_model_dir, tmp_path, capsys):
    from test_training_metrics import write_vqa_rad

    from training.__main__ import main

    write_vqa_rad(tmp_path / "src")
    out = tmp_path / "eval"
    assert main(["eval", "--benchmark", "vqa-rad", "--data", str(tmp_path / "src"), "--model", str(random_model_dir),
                 "--max-new-tokens", "3", "--output", str(out), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["benchmark"] == "vqa-rad" and scores["n"] == 2
    assert set(scores["metrics"]) >= {"closed_accuracy", "token_f1"}
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2


def test_assemble_llm_and_clip_into_a_stage1_start(tmp_path):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from training.engine.assemble import assemble

    tokenizer = smollm2_tokenizer()
    llama3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": llama3})
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=56, patch_size=14)).save_pretrained(tmp_path / "clip")
    out = assemble(str(tmp_path / "llm"), str(tmp_path / "clip"), tmp_path / "base")
    model, processor = load_model(out, dtype=torch.float32)
    assert model.config.prompt_format == "llama3-dragonfly" and processor.image_token == "<|reserved_special_token_0|>"
    assert model.config.get_geometry().feature_grid == 4 and model.config.get_geometry().pooled_grid == 1
    assert model.config.text_config.rope_scaling["rope_type"] == "llama3"  # kept, unlike the release
    assert torch.equal(model.language_model.lm_head.weight, llm.lm_head.weight)


def test_check_measures_exact_lengths(random_model_dir):
    from training.benchmarks.check import check_records, sample_length

    _, processor = load_model(random_model_dir, dtype=torch.float32)
    records = build_mixture(load_recipe("tiny-med-stage3")).datasets[0][:3]
    lengths = [sample_length(processor, r, Image.open(r.image).size) for r in records]
    encoded = [processor(images=[Image.open(r.image)], conversation=[r.turns], return_labels=True)["input_ids"].shape[1] for r in records]
    assert lengths == encoded  # header sizes + the plan give the processor's exact length
    report = check_records(records, processor, max_seq_length=min(lengths))
    assert report.max_length == max(lengths)
    assert report.counts["over_long"] == sum(n > min(lengths) for n in lengths) and report.counts["missing_images"] == 0

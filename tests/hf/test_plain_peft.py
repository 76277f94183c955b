"""QLoRA written the usual way on an llmslim model: plain peft, transformers' Trainer, TRL's SFTTrainer.

No llmslim call beyond `quantization_config=SlimConfig(...)` (or `llmslim.from_pretrained`): the model's
loading lets peft wrap llmslim's quantized layers (`llmslim.hf.lora.enable_peft`).
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmslim
from llmslim.finetune.merge import merged_model
from llmslim.hf import compat
from llmslim.hf.lora import SlimLoraLinear
from llmslim.quant.modules import SlimLinear

WEIGHTS = ("nf4", "fp4", "int4", "int8")
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _load(base, weights: str, door: str = "transformers"):
    config = llmslim.SlimConfig(weights=weights)
    if door == "llmslim":
        return llmslim.from_pretrained(base, config, progress=False)
    return AutoModelForCausalLM.from_pretrained(base, quantization_config=config)


def _ids(seed: int = 1, rows: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 2000, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("door", ["transformers", "llmslim"])
def test_get_peft_model_wraps_every_format_and_trains_only_the_adapter(base, weights, door):
    model = _load(base, weights, door)
    peft_model = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False))
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, SlimLoraLinear)}
    assert sorted(name.rsplit(".", 1)[1] for name in layers) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    ids = _ids()
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in peft_model.named_parameters() if p.requires_grad)


def test_prepare_model_for_kbit_training_does_what_it_does_for_bitsandbytes(base):
    model = _load(base, "nf4")
    assert model.is_loaded_in_4bit and not model.is_loaded_in_8bit
    model = prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing
    floats = [p for p in model.parameters() if p.is_floating_point()]
    assert floats and all(p.dtype == torch.float32 and not p.requires_grad for p in floats)
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    peft_model.train()
    ids = _ids()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)
    assert _load(base, "int8").is_loaded_in_8bit


@pytest.mark.parametrize("weights", ["nf4", "int8"])
def test_adapter_saves_and_loads_with_peft_and_merge_and_unload_equals_llmslim_merge(base, tmp_path, weights):
    torch.manual_seed(3)
    peft_model = get_peft_model(_load(base, weights), LoraConfig(**LORA, init_lora_weights=False)).eval()
    ids = _ids(rows=1)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(_load(base, weights), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted)

    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, SlimLoraLinear) for m in merged.modules())
    # `llmslim merge` of the same adapter into the same quantized base (saved, so every layer is quantized alike)
    llmslim.save_pretrained(_load(base, weights), tmp_path / "quantized-base")
    reference = merged_model(tmp_path / "quantized-base", tmp_path / "adapter", weights)
    for (name, tensor), (ref_name, ref_tensor) in zip(merged.state_dict().items(), reference.state_dict().items(), strict=True):
        assert name == ref_name
        torch.testing.assert_close(tensor, ref_tensor, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        base_logits = _load(base, weights)(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
    # the merged model stays closer to the adapted one than the untrained base is (peft's bnb 4-bit merge did not)
    assert (merged_logits - adapted).abs().mean() < (base_logits - adapted).abs().mean()


def _float_twin(base, quantized):
    """The float model whose quantized layers hold exactly `quantized`'s dequantized weights."""
    twin = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for name, module in quantized.named_modules():
        if isinstance(module, SlimLinear):
            twin.get_submodule(name).weight.data = module.dequantized_weight(torch.float32)
    return twin


@pytest.mark.parametrize("weights", ["nf4", "int8"])
def test_dora_on_llmslim_layers_equals_peft_dora_on_the_dequantized_weights(base, weights):
    dora = dict(LORA, use_dora=True, init_lora_weights=False)
    config = llmslim.SlimConfig(weights=weights, compute_dtype="float32")  # float32 throughout, as the twin
    quantized = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.float32)
    twin = _float_twin(base, quantized)
    torch.manual_seed(5)
    ours = get_peft_model(quantized, LoraConfig(**dora))
    torch.manual_seed(5)
    theirs = get_peft_model(twin, LoraConfig(**dora))
    ids = _ids(rows=1)
    for model in (ours, theirs):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in grads)
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=2e-3, atol=1e-5, msg=name)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        adapted = theirs(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits.float(), adapted, rtol=1e-3, atol=1e-3)
        base_logits = _load(base, weights)(input_ids=ids).logits.float()
        merged = ours.merge_and_unload()(input_ids=ids).logits.float()
    assert (merged - adapted).abs().mean() < (base_logits - adapted).abs().mean()


def test_other_lora_variants_are_refused_by_name(base):
    with pytest.raises(ValueError, match=r"LoRA variants \['alora_invocation_tokens'\] are not supported on llmslim's quantized layers"):
        get_peft_model(_load(base, "nf4"), LoraConfig(**LORA, alora_invocation_tokens=[5]))


def test_the_dispatch_hook_fits_the_installed_peft(base):
    from peft.tuners.lora.model import LoraModel

    _load(base, "nf4")
    assert getattr(LoraModel._create_new_module, "_llmslim_dispatch", None) is not None
    # layers that are not llmslim's still get peft's own LoRA layers
    float_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    wrapped = get_peft_model(float_model, LoraConfig(**LORA))
    q_proj = wrapped.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__.startswith("peft.") and isinstance(compat.peft_base_layer(q_proj), torch.nn.Linear)


def _dataset(tokenizer, rows: int = 16):
    from datasets import Dataset

    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. "
    return Dataset.from_dict({"text": [text * 3] * rows})


def _training_args(cls, out, **extra):
    return cls(
        output_dir=str(out),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        logging_steps=1,
        save_steps=5,
        report_to=[],
        use_cpu=True,
        gradient_checkpointing=True,
        seed=0,
        **extra,
    )


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
def test_transformers_trainer_trains_an_llmslim_model_with_lora_and_the_checkpoint_reloads(base, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token
    data = _dataset(tokenizer).map(lambda row: tokenizer(row["text"], truncation=True, max_length=64), remove_columns=["text"])
    model = prepare_model_for_kbit_training(_load(base, "nf4"))
    model = get_peft_model(model, LoraConfig(**LORA))
    trainer = Trainer(
        model=model,
        args=_training_args(TrainingArguments, tmp_path / "run"),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]

    checkpoint = tmp_path / "run" / "checkpoint-5"
    reloaded = PeftModel.from_pretrained(prepare_model_for_kbit_training(_load(base, "nf4")), checkpoint).eval()
    model.eval()
    ids = _ids(rows=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_trl_sft_trainer_trains_an_llmslim_model_with_lora(base, tmp_path):
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(base)
    trainer = SFTTrainer(
        model=_load(base, "nf4"),
        args=_training_args(SFTConfig, tmp_path / "sft", max_length=64),
        train_dataset=_dataset(tokenizer),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert isinstance(trainer.model, PeftModel)
    assert any(isinstance(m, SlimLoraLinear) for m in trainer.model.modules())
    assert (tmp_path / "sft" / "checkpoint-5" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("door", ["transformers", "llmslim"])
def test_all_linear_targets_every_quantized_layer_but_the_head(base, door):
    if door == "llmslim":  # the head quantized too (an int8 copy of the tied embedding): still left out
        model = llmslim.from_pretrained(base, llmslim.SlimConfig(weights="nf4", exclude=[], int8_layers=["lm_head"]), progress=False)
        assert isinstance(model.lm_head, SlimLinear)
    else:
        model = _load(base, "nf4")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    wrapped = sorted(name.rsplit(".", 1)[1] for name, m in peft_model.named_modules() if isinstance(m, SlimLoraLinear))
    per_block = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert wrapped == sorted(per_block * 2)

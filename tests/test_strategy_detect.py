"""detect.zero_stage (the one "is this DeepSpeed / ZeRO-3?" answer), precision.PRECISIONS (the one
precision -> dtype map) and llmlab.evaluation.generation on one process (the ZeRO-3 paths run in
tests/test_strategy_runs.py and tests/test_distributed_llmlab.py with 2 processes)."""
from __future__ import annotations

import pytest

from tests.conftest import compose_group, run_python
from tests.test_dpo import tiny_lm


def _node(name: str):
    """conf/strategy/<name>.yaml as Hydra composes it (zero2/zero3 extend zero1.yaml)."""
    return compose_group("strategy", name)


@pytest.mark.parametrize(("name", "stage"), [("auto", None), ("ddp", None), ("cpu_bf16", None), ("fsdp", None),
                                             ("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_zero_stage_of_every_strategy_choice(name, stage):
    """The same answer from the config file, its name, and (DeepSpeed) the strategy object it builds."""
    from llmlab.distributed.detect import is_deepspeed, is_zero3, zero_stage

    node = _node(name)
    assert zero_stage(node) == zero_stage(name) == stage
    assert is_deepspeed(node) == (stage is not None) and is_zero3(node) == (stage == 3)
    if stage is not None:
        from hydra.utils import instantiate

        strategy = instantiate(node)
        assert zero_stage(strategy) == zero_stage(strategy.config) == stage
        assert is_zero3(strategy) == strategy.zero_stage_3  # Lightning's own answer


def test_zero_stage_reads_overrides_and_objects():
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from llmlab.distributed.detect import zero_stage

    node = _node("zero2")
    node.config_overrides = {"zero_optimization": {"stage": 3}}
    assert zero_stage(node) == 3  # what DeepSpeed will run, not the yaml's `stage`
    assert zero_stage({"name": "zero3"}) == 3  # a node without _target_: its name
    assert zero_stage({"_target_": "lightning.pytorch.strategies.DeepSpeedStrategy"}) == 2  # Lightning's default
    assert zero_stage(DDPStrategy()) is None and zero_stage(None) is None
    assert zero_stage(torch.nn.Linear(2, 2)) is None  # not partitioned


def test_zero_stage_needs_no_torch():
    """check_settings asks it before torch is imported."""
    code = ("import sys; from llmlab.distributed.detect import zero_stage; from llmlab.models.peft import quant_storage_for;"
            "assert zero_stage({'_target_': 'llmlab.distributed.strategies.deepspeed', 'stage': 3}) == 3;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr


def test_precision_map():
    from llmlab.distributed.precision import autocast_dtype, half_dtype, parameter_dtype, weights_dtype

    assert [weights_dtype(p) for p in ("32-true", "bf16-true", "16-true", "bf16-mixed")] == \
        ["float32", "bfloat16", "float16", None]
    assert autocast_dtype("bf16-mixed") == autocast_dtype("bf16") == "bfloat16"  # bare bf16 is Lightning's mixed
    assert autocast_dtype("bf16-true") is None and half_dtype("bf16-true") == "bfloat16"
    assert [parameter_dtype(p) for p in ("32-true", "bf16-mixed", "16-mixed", "bf16-true")] == \
        ["float32", "bfloat16", "float16", "bfloat16"]


def test_greedy_answers_and_generate_text_agree_with_hf_generate():
    """Left-padded batches give each prompt what HF's generate gives it alone; stop sequences are cut;
    the model's train/eval mode is restored."""
    import torch

    from llmlab.evaluation.generation import generate_text, greedy_answers

    model, tok = tiny_lm()
    prompts = ["reverse abc", "sort dcba xy"]
    alone = []
    model.eval()
    for p in prompts:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        alone.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    model.train()
    assert generate_text(model, tok, prompts, 6, do_sample=False) == alone
    assert generate_text(model, tok, prompts, 6, batch_size=1, do_sample=False) == alone
    assert model.training
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert greedy_answers(model, tok, enc["input_ids"], enc["attention_mask"], 6) == alone
    stop = alone[0][2:3]
    assert stop, alone  # the seeded model's first answer is long enough to cut
    assert generate_text(model, tok, prompts[:1], 6, stop=[stop], do_sample=False)[0] == alone[0].split(stop)[0]

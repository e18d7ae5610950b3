"""A catalog of bad inputs: every one is a real CLI subprocess that must end with exit code 2 and ONE
line `llmlab: error: ...` naming the setting (and the fix), no traceback, and leave an existing run
dir it points at byte-identical.

The cases run concurrently (a pool of 3) in one module fixture: each costs mostly Python/Hydra start-up
(~1-2 s; the pure-config checks run before torch is imported), so the catalog takes about a minute
instead of several. One real tiny training run provides the existing run dir (and a one-job sweep dir)
the export/generate/report/resume cases point at.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, compose_group, run_module

TINY = ["trainer.max_steps=2", "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "data.n_train=64",
        "data.n_val=16", "trainer.enable_progress_bar=false", "model.config.n_layer=1", "model.config.n_embd=32",
        "model.config.n_head=2"]
# no network and an empty hub cache, for certain: the hub cases must fail in seconds, here and anywhere
# an unreachable hub; HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE off even where the developer exports them (they
# change the message to the offline-mode one)
OFFLINE_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}


@dataclass
class Case:
    """One bad input: the entry point, its arguments ({run}, {sweep}, {tmp}... filled in), the texts
    the error line must contain, and the environment it runs with."""
    id: str
    module: str
    args: list[str]
    expect: list[str]
    env: dict = field(default_factory=dict)
    max_seconds: float | None = None


def _run_case(case: Case, places: dict, workdir: Path) -> dict:
    args = [a.format(**places) for a in case.args]
    if case.module in ("llmlab.run", "llmlab.pipeline") and not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={workdir / case.id}")
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(places["tmp"] + "/empty_hf_cache"),
           **{k: v.format(**places) for k, v in case.env.items()}}
    t0 = time.perf_counter()
    proc = run_module(case.module, *args, timeout=300, env=env)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "args": args,
            "seconds": time.perf_counter() - t0}


def _tree_state(root: Path) -> dict[str, tuple]:
    """{relative path: state} of root and everything under it (hidden ones included): a file's sha256, size
    and mtime, a directory's listing and mtime. Equal states: nothing was written, not even rewritten with
    the same bytes, nor created and deleted again (a temporary file changes its directory's mtime)."""
    state = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        if p.is_file():
            state[str(p.relative_to(root))] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size,
                                               st.st_mtime_ns)
        elif p.is_dir():
            state[str(p.relative_to(root))] = ("dir", tuple(sorted(c.name for c in p.iterdir())), st.st_mtime_ns)
        else:
            state[str(p.relative_to(root))] = ("other", st.st_mode, st.st_mtime_ns)
    return state


def _changes(before: dict, after: dict) -> list[str]:
    """What differs between two `_tree_state`s: added, removed and changed paths."""
    return ([f"added {k}" for k in sorted(set(after) - set(before))]
            + [f"removed {k}" for k in sorted(set(before) - set(after))]
            + [f"changed {k}: {before[k]} -> {after[k]}" for k in sorted(set(before) & set(after))
               if before[k] != after[k]])


CASES = [
    # ---- llmlab.run: Hydra composition (unknown keys / options), with a "did you mean"
    Case("run-unknown-key", "llmlab.run", ["trainer.max_step=5"], ["trainer.max_step", "did you mean trainer.max_steps?"]),
    Case("run-unknown-nested-key", "llmlab.run", ["stage.module.lr=1"],
         ["stage.module.lr", "did you mean stage.module.optimizer.lr?"]),
    Case("run-unknown-model", "llmlab.run", ["model=nonexistent_model"], ["model/nonexistent_model", "tiny"]),
    Case("run-unknown-stage", "llmlab.run", ["stage=finetune"], ["stage/finetune", "sft"]),
    Case("run-module-not-a-stage", "llmlab.run", ["stage.module._target_=torch.nn.Linear"],
         ["stage.module._target_=torch.nn.Linear", "not an llmlab stage", "llmlab.stages.interface.Stage"]),
    Case("run-bad-override-syntax", "llmlab.run", ["trainer.max_steps=[1,"], ["'trainer.max_steps=[1,'"]),
    # ---- the hub: unreachable (README headline), typo'd name offline
    Case("run-readme-headline-offline", "llmlab.run", ["model=opt1.3b", "peft=qlora", "strategy=zero3"],
         ["model.pretrained=facebook/opt-1.3b", "cannot be reached", "model.pretrained=<local dir>",
          "model.init=scratch"], env=OFFLINE_HUB, max_seconds=20),
    Case("run-hub-typo-offline-mode", "llmlab.run", ["model.init=pretrained", "model.pretrained=facebok/opt-1.3b"],
         ["model.pretrained=facebok/opt-1.3b", "HF_HUB_OFFLINE=1", "model.init=scratch"],
         env={"HF_HUB_OFFLINE": "1"}, max_seconds=20),
    Case("run-hub-tokenizer-offline", "llmlab.run", ["model.tokenizer=gpt2-typo"],
         ["model.tokenizer=gpt2-typo", "cannot be reached"], env=OFFLINE_HUB, max_seconds=20),
    Case("run-scratch-tokenizer-offline", "llmlab.run", ["model=opt1.3b", "model.init=scratch"],
         ["model.pretrained=facebook/opt-1.3b", "cannot be reached", "model.tokenizer=builtin"], env=OFFLINE_HUB,
         max_seconds=20),
    # ---- numbers and names
    Case("run-negative-lr", "llmlab.run", ["stage.module.optimizer.lr=-1"], ["stage.module.optimizer.lr=-1", "positive"]),
    Case("run-text-lr", "llmlab.run", ["stage.module.optimizer.lr=fast"], ["stage.module.optimizer.lr='fast'", "number"]),
    Case("run-lora-rank-zero", "llmlab.run", ["peft=lora", "peft.r=0"], ["peft.r=0", "peft.r=8"]),
    Case("run-lora-int8-scratch", "llmlab.run", ["peft=lora_int8"], ["peft=lora_int8", "model.init=pretrained"]),
    Case("run-lora-int8-zero3", "llmlab.run", ["peft=lora_int8", "model.init=pretrained", "model.pretrained={run}/hf",
                                               "strategy=zero3"], ["peft=lora_int8 with strategy=zero3", "strategy=ddp"]),
    Case("run-lora-dropout", "llmlab.run", ["peft=lora", "peft.dropout=1.5"], ["peft.dropout=1.5", "[0, 1)"]),
    Case("run-max-steps-zero", "llmlab.run", ["trainer.max_steps=0"], ["trainer.max_steps=0", ">= 1"]),
    Case("run-max-steps-text", "llmlab.run", ["trainer.max_steps=many"], ["trainer.max_steps='many'"]),
    Case("run-val-interval-zero", "llmlab.run", ["trainer.val_check_interval=0"], ["trainer.val_check_interval=0"]),
    Case("run-unknown-scheduler", "llmlab.run", ["stage.module.scheduler.name=cosin"],
         ["stage.module.scheduler.name='cosin'", "cosine, linear, constant"]),
    Case("run-dtype-typo", "llmlab.run", ["model.dtype=bfloat61"], ["model.dtype='bfloat61'", "bfloat16"]),
    Case("run-batch-size-zero", "llmlab.run", ["data.batch_size=0"], ["data.batch_size=0"]),
    Case("run-unknown-init", "llmlab.run", ["model.init=random"], ["model.init='random'", "scratch or pretrained"]),
    Case("run-fp16-on-cpu", "llmlab.run", ["precision=16-mixed"], ["precision=16-mixed", "bf16"]),
    Case("run-attn-implementation-typo", "llmlab.run", ["model.attn_implementation=flash"],
         ["model.attn_implementation='flash'", "flash_attention_2"]),
    Case("run-flash-attention-on-cpu", "llmlab.run", ["model.attn_implementation=flash_attention_2"],
         ["model.attn_implementation=flash_attention_2", "CUDA", "sdpa"]),
    Case("run-flex-attention-training-on-cpu", "llmlab.run", ["model.attn_implementation=flex_attention"],
         ["model.attn_implementation=flex_attention", "backward", "sdpa"]),
    Case("run-attn-implementation-the-model-lacks", "llmlab.run", ["model.attn_implementation=flex_attention",
         "dry_run=true"], ["model.attn_implementation=flex_attention", "GPT2LMHeadModel", "sdpa"]),
    Case("run-block-size-beyond-positions", "llmlab.run", ["data.block_size=4096"], ["data.block_size=4096", "256"]),
    # ---- text and data
    Case("run-braces-in-template", "llmlab.run", ["stage=sft", "model=tiny", "data.prompt_template='Q: {{prompt}} {{x}}'"],
         ["data.prompt_template=", "doubled"]),
    Case("run-template-without-placeholder", "llmlab.run", ["stage=sft", "model=tiny", "data.prompt_template=Q:"],
         ["data.prompt_template='Q:'", "{prompt}"]),
    Case("run-null-text-field", "llmlab.run", ["data.text_field=null"], ["data.text_field is null"]),
    Case("run-missing-data-file", "llmlab.run", ["data=text", "data.block_size=64", "data.train_files=/no/such/file.jsonl"],
         ["data.train_files", "/no/such/file.jsonl"]),
    # ---- the preference family (stage=kto|orpo|simpo): impossible loss/stage/reference combinations, KTO labels
    Case("run-kto-data-without-labels", "llmlab.run", ["stage=kto", "model=tiny", "data=text", "data.block_size=64",
                                          "data.train_files={tmp}/kto_nolabel.jsonl"],
         ["KTO data without labels", "data.label_field='label'"]),
    Case("run-kto-loss-with-pairs", "llmlab.run", ["stage=dpo", "model=tiny", "stage.module.loss._target_=llmlab.losses.KTOLoss"],
         ["stage.module.loss._target_=KTOLoss", "use stage=kto"]),
    Case("run-kto-with-paired-loss", "llmlab.run", ["stage=kto", "model=tiny", "stage.module.loss._target_=llmlab.losses.DPOLoss"],
         ["stage.module.loss._target_=DPOLoss", "KTOLoss"]),
    Case("run-reference-free-with-reference", "llmlab.run", ["stage=simpo", "model=tiny", "stage.module.reference_model=/some/run"],
         ["stage.module.reference_model=/some/run", "no reference model"]),
    Case("run-kto-split-pairs", "llmlab.run", ["stage=kto", "model=tiny", "stage.module.split_pairs=true"],
         ["stage.module.split_pairs=true", "set it to false"]),
    Case("run-kto-batch-of-one", "llmlab.run", ["stage=kto", "model=tiny", "data.batch_size=1"], ["data.batch_size=1", ">= 2"]),
    Case("run-empty-data-file", "llmlab.run", ["data=text", "data.block_size=64", "data.train_files={tmp}/empty.txt"],
         ["data.train_files", "empty"]),
    # ---- models on disk
    Case("run-missing-local-model", "llmlab.run", ["model.init=pretrained", "model.pretrained=/no/such/model"],
         ["model.pretrained=/no/such/model", "no such directory"]),
    Case("run-local-config-wins-over-yaml", "llmlab.run",
         ["model.init=pretrained", "model.pretrained={llama}", "data.block_size=128"],
         ["data.block_size=128", "64 positions", "model.pretrained="]),
    Case("run-trust-remote-code", "llmlab.run", ["model.trust_remote_code=true"], ["model.trust_remote_code=true"]),
    # ---- PPO and resume
    Case("run-ppo-response-length", "llmlab.run", ["stage=ppo", "model=tiny", "stage.module.response_length=[0,4]"],
         ["stage.module.response_length=[0, 4]", "1 <= min <= max"]),
    Case("run-ppo-rule-reward", "llmlab.run", ["stage=ppo", "model=tiny", "stage.rule_reward=llmlab.nowhere.reward"],
         ["stage.rule_reward=llmlab.nowhere.reward", "dotted path"]),
    # ---- GRPO and rewards (issue 10)
    Case("run-grpo-one-generation", "llmlab.run", ["stage=grpo", "model=tiny", "stage.module.num_generations=1"],
         ["stage.module.num_generations=1", ">= 2 per prompt"]),
    Case("run-grpo-batch-not-divisible", "llmlab.run", ["stage=grpo", "model=tiny", "stage.module.mini_batch_size=5"],
         ["stage.module.mini_batch_size=5", "32 prompts x 4 completions = 128", "divisor"]),
    Case("run-grpo-loss-type", "llmlab.run", ["stage=grpo", "model=tiny", "stage.module.loss_type=dapoo"],
         ["stage.module.loss_type=dapoo", "grpo, dr_grpo, dapo, bnpo"]),
    Case("run-reward-user-unimportable", "llmlab.run", ["stage=grpo", "model=tiny", "reward=[task,user]",
                                                        "reward.user.fn=no_such_module_q:score"],
         ["reward.user.fn=no_such_module_q:score", "module:function"]),
    Case("run-reward-user-unset", "llmlab.run", ["stage=grpo", "model=tiny", "reward=[user]", *TINY],
         ["reward.user.fn", "has no value"]),
    Case("run-reward-task-fn-missing", "llmlab.run", ["stage=grpo", "model=tiny", "reward=task", "reward.task.fn=llmlab.data.builtin.nope",
                                                      *TINY], ["reward.task.fn=llmlab.data.builtin.nope", "cannot import"]),
    Case("run-reward-bad-target", "llmlab.run", ["stage=grpo", "model=tiny", "+reward.mine._target_=nowhere_x.F"],
         ["reward.mine._target_=nowhere_x.F", "no such module"]),
    Case("run-load-full-weights-not-zero3", "llmlab.run", ["strategy=zero2", "strategy.load_full_weights=true"],
         ["strategy.load_full_weights=true", "strategy=zero3"]),
    Case("run-missing-ckpt", "llmlab.run", ["ckpt_path=/no/such.ckpt"], ["ckpt_path=/no/such.ckpt"]),
    Case("run-resume-typo-in-run-dir", "llmlab.run", ["hydra.run.dir={run}", "resume=sometimes"], ["resume='sometimes'"]),
    Case("run-resume-bad-lr-in-run-dir", "llmlab.run", ["hydra.run.dir={run}", "resume=auto", *TINY,
                                                        "stage.module.optimizer.lr=0"], ["stage.module.optimizer.lr=0"]),
    # ---- llmlab.pipeline
    Case("pipeline-unknown-chain", "llmlab.pipeline", ["pipeline=rlfh", "out_dir={tmp}/p0"], ["pipeline/rlfh", "rlhf"]),
    Case("pipeline-unknown-key", "llmlab.pipeline", ["rerunn=true", "out_dir={tmp}/p1"], ["rerunn", "did you mean rerun?"]),
    Case("pipeline-given-unknown-stage", "llmlab.pipeline", ["+given.sftt={run}", "out_dir={tmp}/p2"],
         ["given.sftt", "sft"]),
    Case("pipeline-base-missing", "llmlab.pipeline", ["base=/no/such/run", "out_dir={tmp}/p3"], ["base=/no/such/run"]),
    Case("pipeline-overrides-not-a-list", "llmlab.pipeline", ["overrides='trainer.max_steps=5'", "out_dir={tmp}/p4"],
         ["overrides=trainer.max_steps=5", "list"]),
    Case("pipeline-stage-overrides-unknown", "llmlab.pipeline", ["+stage_overrides.ppoo=[trainer.max_steps=1]",
                                                                 "out_dir={tmp}/p5"], ["stage_overrides.ppoo"]),
    Case("pipeline-stage-refuses-setting", "llmlab.pipeline", ["overrides=['trainer.max_steps=0']", "out_dir={tmp}/p6"],
         ["stage 1/4 'pretrain' failed", "trainer.max_steps=0"]),
    # ---- llmlab.generate
    Case("generate-no-args", "llmlab.generate", [], ["give the model first"]),
    Case("generate-no-prompt", "llmlab.generate", ["{run}"], ["prompt=TEXT"]),
    Case("generate-empty-prompt", "llmlab.generate", ["{run}", "prompt="], ["prompt= is empty"]),
    Case("generate-malformed-jsonl", "llmlab.generate", ["{run}", "prompts_file={tmp}/bad.jsonl"],
         ["prompts_file=", "line 2 is not JSON"]),
    Case("generate-jsonl-without-prompt", "llmlab.generate", ["{run}", "prompts_file={tmp}/noprompt.jsonl"],
         ["prompts_file=", "`prompt`"]),
    Case("generate-missing-prompts-file", "llmlab.generate", ["{run}", "prompts_file=/no/such.txt"],
         ["prompts_file=/no/such.txt"]),
    Case("generate-setting-typo", "llmlab.generate", ["{run}", "prompt=x", "temprature=0.5"],
         ["temprature", "did you mean temperature=?"]),
    Case("generate-zero-tokens", "llmlab.generate", ["{run}", "prompt=x", "max_new_tokens=0"], ["max_new_tokens=0"]),
    Case("generate-top-p", "llmlab.generate", ["{run}", "prompt=x", "top_p=2"], ["top_p=2"]),
    Case("generate-dtype-typo", "llmlab.generate", ["{run}", "prompt=x", "dtype=float61"], ["dtype='float61'"]),
    Case("generate-template-braces", "llmlab.generate", ["{run}", "prompt=x", "template={{prompt}} {{y}}"],
         ["template=", "doubled"]),
    Case("generate-out-is-run-dir", "llmlab.generate", ["{run}", "prompt=x", "out={run}"], ["out=", "not a directory"]),
    Case("generate-missing-model-dir", "llmlab.generate", ["/no/such/model", "prompt=x"], ["MODEL=/no/such/model"]),
    Case("generate-hub-unreachable", "llmlab.generate", ["someorg/some-model", "prompt=x"],
         ["MODEL=someorg/some-model", "cannot be reached"], env=OFFLINE_HUB, max_seconds=20),
    # ---- llmlab.export
    Case("export-missing-dir", "llmlab.export", ["/no/such/run"], ["/no/such/run", "no such directory"]),
    Case("export-not-a-run", "llmlab.export", ["{tmp}/empty_dir"], ["neither a run directory"]),
    Case("export-missing-ckpt", "llmlab.export", ["{run}", "--ckpt", "/no/such.ckpt"], ["--ckpt /no/such.ckpt"]),
    Case("export-ckpt-not-a-checkpoint", "llmlab.export", ["{run}", "--ckpt", "{tmp}/bad.jsonl"],
         ["--ckpt", "not a Lightning checkpoint"]),
    Case("export-base-for-a-run", "llmlab.export", ["{run}", "--base", "gpt2"], ["--base is for an adapter"]),
    Case("export-out-is-a-file", "llmlab.export", ["{run}", "--out", "{run}/summary.json"], ["--out", "is a file"]),
    Case("export-dtype-choice", "llmlab.export", ["{run}", "--dtype", "float61"], ["--dtype", "float61"]),
    Case("export-unknown-flag", "llmlab.export", ["{run}", "--outt", "x"], ["--outt"]),
    Case("export-quantize-int4-on-cpu", "llmlab.export", ["{run}", "quantize=int4"],
         ["quantize=int4", "not available on CPU", "quantize=int8"]),
    Case("export-quantize-unknown", "llmlab.export", ["{run}", "quantize=fp8"], ["quantize=fp8", "known: int8"]),
    Case("export-quantize-hf-dir-needs-out", "llmlab.export", ["{run}/hf", "quantize=int8"],
         ["is an HF model directory", "--out DIR"]),
    # ---- llmlab.report
    Case("report-missing-dir", "llmlab.report", ["/no/such/sweep"], ["/no/such/sweep", "no such sweep dir"]),
    Case("report-not-a-sweep", "llmlab.report", ["{tmp}/empty_dir"], ["no job dirs"]),
    Case("report-metric-typo", "llmlab.report", ["{sweep}", "--metric", "val_los_last"],
         ["--metric val_los_last", "did you mean --metric val_loss_last?"]),
    Case("report-out-is-a-file", "llmlab.report", ["{sweep}", "--out", "{run}/summary.json"], ["--out", "is a file"]),
    Case("report-unknown-flag", "llmlab.report", ["{sweep}", "--maximise"], ["--maximise"]),
    # ---- llmlab.eval (lm-eval): checked before any model loads
    Case("eval-no-model", "llmlab.eval", [], ["give the model first"]),
    Case("eval-unknown-task", "llmlab.eval", ["{run}", "eval.tasks=[arc_easyy]"],
         ["eval.tasks", "'arc_easyy'", "close ones: arc_easy"], max_seconds=20),
    Case("eval-unknown-own-task", "llmlab.eval", ["{run}", "eval.tasks=[llmlab_builtin_mcc]"],
         ["'llmlab_builtin_mcc'", "llmlab_builtin_mc"]),
    Case("eval-course-offline", "llmlab.eval", ["{run}", "eval=course"], ["eval=course", "hub", "offline",
                                                                             "eval=builtin"],
         env={"HF_DATASETS_OFFLINE": "1"}, max_seconds=20),
    Case("eval-run-without-export", "llmlab.eval", ["{tmp}/noexport"], ["without an export", "llmlab.export"]),
    Case("eval-unknown-task-set", "llmlab.eval", ["{run}", "eval=corse"], ["eval/corse", "course"]),
    Case("eval-setting-typo", "llmlab.eval", ["{run}", "limt=5"], ["limt", "did you mean limit?"]),
    Case("eval-perplexity-without-file", "llmlab.eval", ["{run}", "eval=perplexity"], ["eval.text_file"]),
    Case("eval-adapter-of-full-run", "llmlab.eval", ["{run}", "load=adapter"], ["load=adapter", "hf_adapter"]),
    Case("eval-missing-model-dir", "llmlab.eval", ["/no/such/model"], ["MODEL=/no/such/model"]),
    Case("run-eval-callback-course-offline", "llmlab.run", ["callbacks=with_eval", "callbacks.lm_eval.task_set=course"],
         ["callbacks.lm_eval.task_set=course", "hub"], env={"HF_DATASETS_OFFLINE": "1"}, max_seconds=20),
    Case("run-eval-callback-task-set-typo", "llmlab.run", ["callbacks=with_eval", "callbacks.lm_eval.task_set=buildin"],
         ["callbacks.lm_eval.task_set='buildin'", "did you mean builtin?"]),
    Case("run-eval-callback-every-n", "llmlab.run", ["callbacks=with_eval", "callbacks.lm_eval.every_n_steps=7"],
         ["callbacks.lm_eval.every_n_steps=7", "trainer.val_check_interval"]),
    # ---- compile: a switch (a mode name is not), and inductor's C++ compiler found before weights load
    Case("run-compile-not-a-switch", "llmlab.run", ["compile=max-autotune"],
         ["compile='max-autotune'", "compile=true", "compile=false"], max_seconds=20),
    Case("run-release-memory-not-a-switch", "llmlab.run", ["release_freed_memory=yes"],
         ["release_freed_memory='yes'", "release_freed_memory=true", "release_freed_memory=false"], max_seconds=20),
    Case("run-loss-chunk-with-compile", "llmlab.run", ["stage.module.loss_chunk_tokens=64", "compile=true"],
         ["stage.module.loss_chunk_tokens=64", "compile=true", "drop one"], max_seconds=20),
    Case("run-compile-no-cxx", "llmlab.run", ["compile=true"],
         ["compile=true", "C++ compiler", "/nonexistent/g++", "compile=false"], env={"CXX": "/nonexistent/g++"},
         max_seconds=60),  # imports torch, lightning and inductor first: 30.7 s seen with the suite's 2 workers busy
]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Run every case (a pool of 3 subprocesses) against one real finished tiny run; returns the
    results by case id, the places, and the run/sweep dirs' hashes before and after."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    sweep = tmp / "sweep"
    run = sweep / "0"
    proc = run_module("llmlab.run", *TINY, f"hydra.run.dir={run}", timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp / "empty_dir").mkdir()
    (tmp / "noexport").mkdir()  # a run dir whose training never exported (config, no hf/)
    (tmp / "noexport" / "config_resolved.yaml").write_bytes((run / "config_resolved.yaml").read_bytes())
    (tmp / "empty.txt").write_text("")
    (tmp / "empty_hf_cache").mkdir()
    (tmp / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b",\n')
    (tmp / "noprompt.jsonl").write_text('{"question": "a"}\n')
    (tmp / "kto_nolabel.jsonl").write_text('{"prompt": "reverse abc", "completion": "cba"}\n')
    llama = tmp / "llama"  # a real llama config.json (64 positions), where the yaml `config:` says gpt2/256
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 2, "num_hidden_layers": 1, "num_key_value_heads": 2, "vocab_size": 300,
        "max_position_embeddings": 64}))
    places = {"tmp": str(tmp), "run": str(run), "sweep": str(sweep), "llama": str(llama)}
    before = _tree_state(sweep)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(3) as pool:
        results = dict(zip([c.id for c in CASES], pool.map(lambda c: _run_case(c, places, tmp / "runs"), CASES)))
    wall = time.perf_counter() - t0
    print(f"\n{len(CASES)} bad inputs in {wall:.1f} s wall; slowest: "
          + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in sorted(results.items(), key=lambda kv: -kv[1]['seconds'])[:5]))
    return {"results": results, "places": places, "before": before, "after": _tree_state(sweep)}


def test_catalog_has_40_cases_across_all_entry_points():
    modules = {c.module for c in CASES}
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert modules == {"llmlab.run", "llmlab.pipeline", "llmlab.generate", "llmlab.export", "llmlab.report",
                       "llmlab.eval"}


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(catalog, case):
    r = catalog["results"][case.id]
    shown = f"args: {r['args']}\nexit {r['rc']}\nSTDERR:\n{r['stderr'][-3000:]}\nSTDOUT:\n{r['stdout'][-1500:]}"
    assert r["rc"] == 2, shown
    assert "Traceback" not in r["stdout"] + r["stderr"], shown
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("llmlab: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], shown  # one line, the last word
    for text in case.expect:
        assert text in errors[0], f"{text!r} not in the error line\n{shown}"
    if case.max_seconds:
        assert r["seconds"] < case.max_seconds, f"took {r['seconds']:.1f} s\n{shown}"


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_existing_run_dir_is_left_byte_identical(catalog):
    """The export/generate/report/resume cases pointed at a finished run (two resume cases run into it,
    concurrently with others): nothing was written there, not even rewritten with the same bytes: no file
    added, removed or changed, no mtime moved (files and directories). Hydra writes no .hydra/ and
    run.log is opened only once the checks pass (llmlab/checkpointing/run_dir.py)."""
    assert _changes(catalog["before"], catalog["after"]) == []


def _existing_run_copy(catalog, dest: Path) -> Path:
    """A copy of the catalog's finished run (the catalog's own stays as the other tests read it)."""
    run = dest / "run"
    shutil.copytree(catalog["places"]["run"], run, copy_function=shutil.copy2)
    return run


def _llmlab_run(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmlab.run", f"hydra.run.dir={run_dir}", *overrides],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


# refused early (check_settings, before torch is imported) and late (the resume check: it loads the
# checkpoint, after check_config)
REFUSED_EARLY = ["resume=auto", *TINY, "stage.module.optimizer.lr=0"]
REFUSED_LATE = ["resume=auto", *TINY, "model.config.n_embd=64"]


def _watch(run: Path, before: dict, procs: list[subprocess.Popen], kill_after: dict[int, float]) -> list[str]:
    """Poll the run dir while `procs` run (SIGKILL proc i after kill_after[i] s): every change seen."""
    seen, t0 = [], time.monotonic()
    while any(p.poll() is None for p in procs):
        for i, after in kill_after.items():
            if procs[i].poll() is None and time.monotonic() - t0 > after:
                procs[i].send_signal(signal.SIGKILL)
        seen += _changes(before, _tree_state(run))
        time.sleep(0.05)
    return seen


@pytest.mark.slow  # the late refusal imports torch and loads the checkpoint (~5-25 s on 2 busy cores)
def test_concurrent_refused_commands_leave_run_dir_byte_identical(catalog, tmp_path):
    """Issue 20: three refused commands aimed at one existing run dir at once (two refused early, one
    by the resume check): the run dir never changes while they run, and is byte-identical after."""
    run = _existing_run_copy(catalog, tmp_path)
    before = _tree_state(run)
    procs = [_llmlab_run(run, *REFUSED_LATE), _llmlab_run(run, *REFUSED_EARLY), _llmlab_run(run, *REFUSED_EARLY)]
    seen = _watch(run, before, procs, {})
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("llmlab: error:"), err[-3000:]
    assert "model.config.n_embd: 32 -> 64" in outs[0][1]
    assert seen == [] and _changes(before, _tree_state(run)) == []


@pytest.mark.slow  # as above
def test_refused_command_killed_midway_leaves_run_dir_untouched(catalog, tmp_path):
    """A refused command killed with SIGKILL mid-way (here at 0.5 s: Hydra's job start, and at 2 s: inside
    the checks) cannot leave the run dir altered: nothing is written there before the checks pass (the
    dir is polled while they run), so there is nothing to undo."""
    run = _existing_run_copy(catalog, tmp_path)
    before = _tree_state(run)
    procs = [_llmlab_run(run, *REFUSED_LATE), _llmlab_run(run, *REFUSED_LATE)]
    seen = _watch(run, before, procs, {0: 0.5, 1: 2.0})
    for p in procs:
        p.communicate(timeout=60)
    assert -signal.SIGKILL in [p.returncode for p in procs]  # at least one really was killed mid-way
    assert all(p.returncode in (-signal.SIGKILL, 2) for p in procs)
    assert seen == [] and _changes(before, _tree_state(run)) == []


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_refused_chain_leaves_no_pipeline_log(catalog):
    """A chain refused by its own checks (before any stage runs) writes nothing into its out dir: its
    pipeline.log is held in memory and opened only once the checks pass (Hydra's default job logging
    created an empty one at start). A chain whose stage refuses a setting got that far: it has its log."""
    runs = Path(catalog["places"]["tmp"]) / "runs"
    refused = [c.id for c in CASES if c.module == "llmlab.pipeline" and c.id != "pipeline-stage-refuses-setting"]
    assert len(refused) == 6
    for case_id in refused:
        out = runs / case_id
        assert not out.exists() or list(out.iterdir()) == [], (case_id, list(out.iterdir()))
    log = runs / "pipeline-stage-refuses-setting" / "pipeline.log"
    assert "[1/4] pretrain" in log.read_text()


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_successful_run_has_its_hydra_files(catalog):
    """A run that passed its checks has .hydra/config.yaml, hydra.yaml and overrides.yaml as Hydra wrote
    them (llmlab writes them, atomically, once the checks pass): the job config unresolved, the hydra
    node, the task overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    run = Path(catalog["places"]["run"])
    hydra_dir = run / ".hydra"
    assert sorted(p.name for p in hydra_dir.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) == TINY
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        composed = compose("train", overrides=TINY)
    assert (hydra_dir / "config.yaml").read_text() == OmegaConf.to_yaml(composed)  # unresolved, no hydra node
    assert "${hydra:runtime.output_dir}" in (hydra_dir / "config.yaml").read_text()
    h = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]
    assert h["runtime"]["output_dir"] == str(run) and h["run"]["dir"] == str(run)
    assert h["overrides"]["task"] == TINY and h["overrides"]["hydra"] == [f"hydra.run.dir={run}", "hydra.mode=RUN"]
    assert h["output_subdir"] == ".hydra" and h["job"]["name"] == "run"
    assert h["job_logging"]["handlers"]["file"]["class"] == "llmlab.checkpointing.run_dir.DeferredFileHandler"
    assert "model tiny:" in (run / "run.log").read_text()  # the log, held until the checks passed, is there


@pytest.mark.slow  # two dry-run jobs (~10 s of CPU)
def test_sweep_jobs_have_their_hydra_files(tmp_path):
    """In a sweep, every job dir gets its .hydra/ files too: a job that passed its checks (a dry run) and
    a job refused by them in its fresh dir (as before: the report reads its overrides)."""
    sweep = tmp_path / "sweep"
    proc = run_module("llmlab.run", "-m", *TINY, "dry_run=true", "stage.module.optimizer.lr=0.001,-1.0",
                      f"hydra.sweep.dir={sweep}", timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, lr in (("0", "0.001"), ("1", "-1.0")):
        hydra_dir = sweep / job / ".hydra"
        assert sorted(p.name for p in hydra_dir.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
        # as Hydra's sweeper writes them: each job's overrides re-printed (false -> False)
        overrides = [o.replace("=false", "=False") for o in TINY] + ["dry_run=True", f"stage.module.optimizer.lr={lr}"]
        assert yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) == overrides
        h = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]
        assert h["runtime"]["output_dir"] == str(sweep / job) and h["job"]["num"] == int(job)
        assert yaml.safe_load((hydra_dir / "config.yaml").read_text())["stage"]["module"]["optimizer"]["lr"] == float(lr)
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "failed"


def test_hub_load_errors_are_rephrased():
    """A typo'd hub name while the hub IS reachable cannot be produced offline; the rephrasing of the
    errors transformers raises then is checked on the real exception types."""
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError

    from llmlab.checks.hub import hub_error

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/facebook/opt-1.3bb"))
    err = hub_error("model.pretrained", "facebook/opt-1.3bb",
                    RepositoryNotFoundError("404 Client Error.\nRepository Not Found", response=response))
    assert str(err).startswith("model.pretrained=facebook/opt-1.3bb: no such model on the Hugging Face hub")
    assert "\n" not in str(err)
    err = hub_error("model.pretrained", "x/y", OSError("x/y is not a local folder and is not a valid model "
                                                       "identifier listed on 'https://huggingface.co/models'\nIf"))
    assert "no such model" in str(err) and "\n" not in str(err)
    err = hub_error("MODEL", "x/y", OSError("disk full\nmore"))
    assert str(err) == ("MODEL=x/y: cannot load it (OSError: disk full); pass a local directory with config.json "
                        "and weights, or check the hub name")


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_load_full_weights_is_accepted_where_it_works(catalog):
    """The resume check suggests strategy.load_full_weights=true for a single-file checkpoint: it must
    then accept it with ZeRO-3 (the only stage where Lightning loads full weights), and refuse ZeRO-2."""
    from llmlab.errors import ConfigError
    from llmlab.checks.strategy import check_checkpoint_for_strategy

    ckpt = Path(catalog["places"]["run"]) / "checkpoints" / "last.ckpt"
    zero3 = compose_group("strategy", "zero3")
    with pytest.raises(ConfigError, match="strategy.load_full_weights=true"):
        check_checkpoint_for_strategy(ckpt, zero3)
    zero3.load_full_weights = True
    check_checkpoint_for_strategy(ckpt, zero3)
    zero2 = compose_group("strategy", "zero2")
    zero2.load_full_weights = True
    with pytest.raises(ConfigError):
        check_checkpoint_for_strategy(ckpt, zero2)


def test_ppo_constructor_names_the_setting():
    """PPOModule built directly (not through the CLI checks): ConfigError naming the setting."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmlab.data.tokenizer import builtin_tokenizer
    from llmlab.errors import ConfigError
    from llmlab.stages.ppo import PPOModule

    tok = builtin_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=64))
    opt = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731
    with pytest.raises(ConfigError, match=r"stage.module.response_length=\[4, 2\]"):
        PPOModule(model, tok, opt, rule_reward="llmlab.data.builtin.rule_reward", response_length=[4, 2])
    with pytest.raises(ConfigError, match="stage.rule_reward=llmlab.data.builtin.no_such_reward"):
        PPOModule(model, tok, opt, rule_reward="llmlab.data.builtin.no_such_reward")

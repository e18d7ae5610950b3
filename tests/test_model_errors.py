"""A user's model directory that cannot train (issue 21 point 8), through the real CLI: weights missing, truncated or
corrupt, sizes transformers refuses (or builds and fails on later), a model type PEFT has no defaults for. Each
must exit 2 with one `llmlab: error:` line naming the value and the fix, no traceback, before weights load, and
write nothing into its (new) run dir but what a refused run records there (.hydra/ and run.log:
llmlab/checkpointing/run_dir.py), never a summary, checkpoint or export.

The cases run two at a time in one module fixture (this machine's two cores). Those refused by the config-only
checks (no torch import: ~1.5 s of CPU each) run through the CLI in the fast tier; those refused on the
meta-device build (`checks.model.check_architecture`, ~8 s of CPU each for the torch/transformers/Lightning
imports) are checked in-process in the fast tier and through the CLI in the slow tier.
"""
from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import run_module

REFUSED_RUN_FILES = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "run.log"}


def _edit_config(d: Path, **values) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(values)
    (d / "config.json").write_text(json.dumps(config))


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # the header whole, half of the tensors gone


def _corrupt_header(d: Path) -> None:
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"\x00garbage\xffnot{js"  # the header's first bytes: no longer JSON, the length unchanged
    f.write_bytes(bytes(data))


def _missing_shard(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))


# id -> (family, how the directory is broken, extra overrides, texts the error line must hold)
CASES = {
    "weights-missing": ("qwen2", lambda d: (d / "model.safetensors").unlink(), [],
                        ["no weights", "model.safetensors", "model.init=scratch"]),
    "weights-truncated": ("qwen2", _truncate, [], ["model.safetensors is truncated", "header places tensors"]),
    "weights-corrupt-header": ("qwen2", _corrupt_header, [], ["model.safetensors is corrupt", "not safetensors JSON"]),
    "weights-shard-missing": ("qwen2", _missing_shard, [],
                              ["model.safetensors.index.json names 1 weight file", "model-00002-of-00002"]),
    "heads-do-not-divide-width": ("qwen2", lambda d: _edit_config(d, num_attention_heads=5, num_key_value_heads=5), [],
                                  ["config.json's num_attention_heads=5 does not divide hidden_size=64",
                                   "num_attention_heads=4"]),
    "kv-heads-do-not-divide-heads": ("qwen2", lambda d: _edit_config(d, num_key_value_heads=3), [],
                                     ["num_key_value_heads=3 does not divide num_attention_heads=4",
                                      "num_key_value_heads=2"]),
    "zero-size": ("qwen2", lambda d: _edit_config(d, intermediate_size=0), [],
                  ["config.json's intermediate_size=0", "positive integer"]),
    "negative-size-override": ("qwen2", lambda d: None, ["+model.config_overrides.num_hidden_layers=-1"],
                               ["model.config_overrides.num_hidden_layers=-1", "positive integer"]),
}
# refused on the meta-device build
META_CASES = {
    # a value no llmlab rule names: transformers' own validation, caught on the meta-device build
    "transformers-refuses": ("qwen2", lambda d: _edit_config(d, layer_types=["full_attention"] * 3), [],
                             ["transformers cannot build this architecture", "layer_types",
                              "its config.json or model.config_overrides"]),
    "override-not-a-setting": ("qwen2", lambda d: None, ["+model.config_overrides.router_aux=1"],
                               ["model.config_overrides: ['router_aux'] are not settings of a qwen2 config"]),
    # PEFT's IA3 table has no qwen3_moe entry: the module names to choose from are listed
    "ia3-type-peft-does-not-know": ("qwen3_moe", lambda d: None, ["peft=ia3"],
                                    ["PEFT has no default peft.target_modules for model type 'qwen3_moe'",
                                     "'k_proj', 'o_proj', 'q_proj', 'v_proj'"]),
}


def broken_dir(family_dir, tmp: Path, case) -> Path:
    family, breaks, _, _ = case
    model_dir = tmp / "models" / str(id(case))
    shutil.copytree(family_dir(family), model_dir)
    breaks(model_dir)
    return model_dir


def run_catalog(family_dir, tmp: Path, cases: dict) -> dict:
    def run(case_id: str) -> dict:
        model_dir, overrides = broken_dir(family_dir, tmp, cases[case_id]), cases[case_id][2]
        run_dir = tmp / "runs" / case_id
        t0 = time.perf_counter()
        proc = run_module("llmlab.run", "stage=sft", "model=hf", f"model.pretrained={model_dir}", *overrides,
                          f"hydra.run.dir={run_dir}", timeout=120, env={"OMP_NUM_THREADS": "1"})
        written = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()} if run_dir.exists() else set()
        return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "written": written,
                "seconds": time.perf_counter() - t0}

    for family in {c[0] for c in cases.values()}:
        family_dir(family)  # built once, before the threads copy it
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        out = dict(zip(cases, pool.map(run, cases)))
    print(f"\n{len(cases)} model errors in {time.perf_counter() - t0:.1f} s wall: "
          + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in out.items()))
    return out


@pytest.fixture(scope="module")
def results(family_dir, tmp_path_factory):
    return run_catalog(family_dir, tmp_path_factory.mktemp("model_errors"), CASES)


@pytest.fixture(scope="module")
def meta_results(family_dir, tmp_path_factory):
    return run_catalog(family_dir, tmp_path_factory.mktemp("model_errors_meta"), META_CASES)


def assert_one_line(r: dict, expect: list[str]) -> None:
    shown = f"exit {r['rc']}\nSTDERR:\n{r['stderr'][-3000:]}\nSTDOUT:\n{r['stdout'][-1500:]}"
    assert r["rc"] == 2, shown
    assert "Traceback" not in r["stdout"] + r["stderr"], shown
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("llmlab: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], shown
    for text in expect:
        assert text in errors[0], f"{text!r} not in the error line\n{shown}"
    assert r["written"] <= REFUSED_RUN_FILES, r["written"]  # no summary.json, checkpoint or hf/


@pytest.mark.parametrize("case_id", CASES)
def test_model_error_is_one_line_before_weights_load(results, case_id):
    assert_one_line(results[case_id], CASES[case_id][3])


@pytest.mark.parametrize("case_id", META_CASES)
def test_meta_build_refusal_names_the_value(family_dir, tmp_path, case_id):
    """The same checks the CLI runs after the config-only ones (checks/entry.py check_config), in-process."""
    import llmlab.run  # noqa: F401 (the config resolvers)
    from llmlab.checks.model import check_architecture, check_peft
    from llmlab.errors import ConfigError
    from tests.test_config import compose_resolved

    case = META_CASES[case_id]
    cfg, _ = compose_resolved(["stage=sft", "model=hf", f"model.pretrained={broken_dir(family_dir, tmp_path, case)}",
                               *case[2]])
    with pytest.raises(ConfigError) as err:
        check_peft(cfg, check_architecture(cfg))
    for text in case[3]:
        assert text in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", META_CASES)
def test_meta_build_refusal_through_the_cli(meta_results, case_id):
    assert_one_line(meta_results[case_id], META_CASES[case_id][3])

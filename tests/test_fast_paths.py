"""Fast-path options (issue 13): each gives the same training as the path it replaces.

`stage.module.optimizer.fused=true` (torch AdamW's fused kernel): the same loss trajectory as torch's
per-tensor AdamW (`fused=null`, the default) at fp32 and under bf16-mixed (with gradient clipping on, which Lightning's mixed-precision
plugin refuses for fused optimizers unless `stages.common.configure_optimizers` clears their
`_step_supports_amp_scaling`), and stopping + resuming under it reproduces its uninterrupted run (the
fused optimizer's state round-trips through the checkpoint). The attention path needs no option: the
packed block-diagonal mask already runs on SDPA's fused CPU kernel (bench/profile_step.py attention);
tests/test_packing.py keeps its document-masking guarantee on GPT-2, OPT and Llama (eager and compiled). GPT-2
configs can take `+model.config.activation_function=gelu_pytorch_tanh` (one GELU kernel instead of HF's
elementwise `gelu_new`).

`compile=true` (the model's forward through torch.compile, inductor, in place): the same loss trajectory as
eager, the same checkpoint keys and a loadable `hf/` export, and exact resume with it on. On this 2-core CPU a
cold compile of the tiny model's graphs (validation's no-grad one, then training's) adds ~15-50 s to a run
(more under load); inductor's on-disk cache makes a repeat ~2-3 s.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, assert_ok, run_cli

COMMON = [*FAST, "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
          "trainer.max_steps=8", "callbacks.samples=null", "callbacks.hf_export=null"]
FUSED, PLAIN = "stage.module.optimizer.fused=true", "stage.module.optimizer.fused=null"
COMPILE = "compile=true"


def history(run_dir) -> dict:
    return dict(json.loads((run_dir / "history.json").read_text())["train/loss"])


@pytest.fixture(scope="module")
def fp32_dirs(tmp_path_factory) -> dict:
    """The fp32 per-tensor-AdamW and fused-AdamW run dirs, trained once for the tests that compare against them."""
    root = tmp_path_factory.mktemp("fp32")
    for name, extra in (("plain", [PLAIN]), ("fused", [FUSED])):
        assert_ok(run_cli(root / name, *COMMON, *extra))
    return {name: root / name for name in ("plain", "fused")}


@pytest.fixture(scope="module")
def fp32_runs(fp32_dirs) -> dict:
    return {name: history(run_dir) for name, run_dir in fp32_dirs.items()}


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    """fp32_runs' plain run with compile=true and the hf/ export on; dynamo logs its recompiles (TORCH_LOGS)."""
    with_export = [o for o in COMMON if o != "callbacks.hf_export=null"]
    run = run_cli(tmp_path_factory.mktemp("compiled") / "run", *with_export, PLAIN, COMPILE,
                  env={"TORCH_LOGS": "recompiles"})
    assert_ok(run)
    return run


@pytest.mark.slow  # two tiny training runs each (~10 s apiece on an idle core; fp32's are shared)
@pytest.mark.parametrize("precision,rel", [("32", 1e-4), ("bf16-mixed", 2e-3)])
def test_fused_adamw_same_losses(request, cli, tmp_path, precision, rel):
    if precision == "32":
        runs = request.getfixturevalue("fp32_runs")
        ref, got = runs["plain"], runs["fused"]
    else:
        for name, extra in (("plain", [PLAIN]), ("fused", [FUSED])):
            assert_ok(cli(*COMMON, f"precision={precision}", *extra, run_dir=tmp_path / name))
        ref, got = history(tmp_path / "plain"), history(tmp_path / "fused")
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    assert ref[8] < ref[1]  # it trains
    for step, v in ref.items():  # the fused kernel only reorders rounding of the same update
        assert got[step] == pytest.approx(v, rel=rel), step


@pytest.mark.slow  # two tiny training runs (+ the shared uninterrupted one)
def test_fused_adamw_resume_is_exact(cli, tmp_path, fp32_runs):
    part = tmp_path / "part"
    assert_ok(cli(*COMMON, FUSED, "stop_at_step=4", run_dir=part))
    resumed = cli(*COMMON, FUSED, "resume=auto", run_dir=part)
    assert_ok(resumed)
    assert resumed.summary["global_step"] == 8
    ref, tail = fp32_runs["fused"], history(part)
    for step in range(5, 9):
        assert tail[step] == pytest.approx(ref[step], rel=1e-4), step


@pytest.mark.slow  # one tiny training run (+ the shared default one)
def test_fused_gelu_same_losses_as_gelu_new(cli, tmp_path, fp32_runs):
    """GPT-2's default activation `gelu_new` (the tiny model's, so the shared plain run is its run) is HF's
    tanh GELU written as ~8 elementwise ops (~13% of an 85M fp32 step, bench/RESULTS.md cpu_mfu);
    `gelu_pytorch_tanh` is the same function in one kernel."""
    assert_ok(cli(*COMMON, "+model.config.activation_function=gelu_pytorch_tanh", run_dir=tmp_path / "tanh"))
    ref, got = fp32_runs["plain"], history(tmp_path / "tanh")
    assert sorted(got) == sorted(ref) == list(range(1, 9)) and ref[8] < ref[1]
    from hydra import compose, initialize_config_dir

    from llmlab.models.build import build_model, build_tokenizer
    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):  # the override reaches the model's MLP
        cfg = compose("train", overrides=[*FAST, "+model.config.activation_function=gelu_pytorch_tanh"])
    act = build_model(cfg.model, build_tokenizer(cfg.model)).transformer.h[0].mlp.act
    assert type(act).__name__ == "GELUTanh"
    for step, v in ref.items():
        assert got[step] == pytest.approx(v, rel=1e-4), step


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_compile_is_in_place_on_the_transformers_model(peft):
    """`models.compile_forward` compiles the transformers model itself (inside PEFT's wrappers), in place:
    the state_dict keys (checkpoints, resume, hf/) are the eager model's. Nothing compiles until a forward."""
    from hydra import compose, initialize_config_dir

    from llmlab.models.build import build_model, build_tokenizer, compile_forward
    from llmlab.models.peft import apply_peft
    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, f"peft={peft}", COMPILE])
    model = apply_peft(build_model(cfg.model, build_tokenizer(cfg.model)), cfg.peft)
    keys = list(model.state_dict())
    compiled = compile_forward(model)
    assert compiled is (model if peft == "none" else model.get_base_model())
    assert type(compiled).__name__ == "GPT2LMHeadModel" and compiled._compiled_call_impl is not None
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)


@pytest.mark.slow  # one tiny training run with compile (+ the shared eager one); its compile ~15-50 s cold
def test_compile_same_losses_checkpoint_and_export(compiled_run, fp32_dirs, fp32_runs):
    """compile=true vs eager (fp32_runs' plain run, same settings): the same losses (rel 1e-4; measured <= 1e-7,
    inductor only reorders rounding), the same checkpoint keys, and an hf/ export that loads whole."""
    import torch
    from transformers import AutoModelForCausalLM

    log = compiled_run.stdout + compiled_run.stderr
    # dynamo traced the forward (validation's no-grad graph recompiled for training's grad mode) and never
    # gave up on it (its limit is 8 graphs per function; past it the function runs eager)
    assert "Recompiling function" in log and "recompile_limit" not in log
    ref, got = fp32_runs["plain"], history(compiled_run.dir)
    assert sorted(got) == sorted(ref) == list(range(1, 9)) and ref[8] < ref[1]
    for step, v in ref.items():
        assert got[step] == pytest.approx(v, rel=1e-4), step
    ckpt = torch.load(compiled_run.dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    eager = torch.load(fp32_dirs["plain"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert list(ckpt["state_dict"]) == list(eager["state_dict"])
    hf, info = AutoModelForCausalLM.from_pretrained(compiled_run.dir / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in hf.state_dict().items():  # the export is the checkpoint's final weights
        assert torch.equal(tensor, ckpt["state_dict"][f"model.{name}"]), name


@pytest.mark.slow  # two tiny training runs with compile (graphs from the shared compiled run's cache: seconds)
def test_compile_resume_is_exact(cli, tmp_path, compiled_run):
    part = tmp_path / "part"
    assert_ok(cli(*COMMON, PLAIN, COMPILE, "stop_at_step=4", run_dir=part))
    resumed = cli(*COMMON, PLAIN, COMPILE, "resume=auto", run_dir=part)
    assert_ok(resumed)
    assert resumed.summary["global_step"] == 8
    ref, tail = history(compiled_run.dir), history(part)
    for step in range(5, 9):
        assert tail[step] == pytest.approx(ref[step], rel=1e-4), step

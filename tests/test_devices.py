"""What a run trains on (llmlab/distributed/devices.py): trainer.accelerator=auto and precision=default decided by
llmlab, the GPU branch by its decision functions (no GPU here), the CPU branch for real through the CLI; bf16
emulation detected from /proc/cpuinfo's flags (both flag sets) and a measured matmul ratio."""
from __future__ import annotations

import re

import pytest
from conftest import FAST, assert_ok, run_cli

from llmlab.distributed.devices import (
    bf16_emulation_warning,
    choose_accelerator,
    choose_precision,
    cpu_bf16_support,
    cpu_flags,
    describe,
    matmul_ratio,
)
from tests.test_config import bases_without_building, compose_resolved  # the first: a fixture

# /proc/cpuinfo lines of the machines seen (../shared/ENVIRONMENT.md): AMD EPYC with avx512_bf16; AMD EPYC with no
# AVX-512 at all (bf16 emulated: 0.9 vs 120 GFLOP/s fp32)
AVX512_BF16 = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni\n"
NO_AVX512 = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_auto_accelerator_is_the_gpu_when_cuda_sees_one_else_the_cpu():
    assert choose_accelerator("auto", cuda_available=True, device_count=8) == "gpu"
    assert choose_accelerator("auto", cuda_available=False, device_count=0) == "cpu"
    assert choose_accelerator("auto", cuda_available=True, device_count=0) == "cpu"
    # a CPU strategy stays on the CPU on a GPU machine; DeepSpeed / DDP / FSDP go to the GPUs
    assert choose_accelerator("auto", True, 8, strategy="cpu_bf16") == "cpu"
    for strategy in ("auto", "ddp", "zero3", "fsdp"):
        assert choose_accelerator("auto", True, 8, strategy=strategy) == "gpu"
    # an explicit choice is kept (check_devices refuses gpu without one)
    assert choose_accelerator("cpu", True, 8) == "cpu"
    assert choose_accelerator("gpu", False, 0) == "gpu"


def test_default_precision_is_bf16_mixed_on_a_gpu_and_fp32_on_the_cpu():
    assert choose_precision("default", "32-true", "gpu") == "bf16-mixed"
    assert choose_precision("default", "32-true", "gpu", bf16_supported=False) == "16-mixed"  # pre-Ampere
    assert choose_precision("default", "32-true", "cpu") == "32-true"
    # a named precision (command line, experiment, strategy=cpu_bf16's override) is kept anywhere
    for choice, precision in (("32", "32-true"), ("bf16-true", "bf16-true"), ("16-mixed", "16-mixed")):
        assert choose_precision(choice, precision, "gpu") == precision
    assert choose_precision(None, "32-true", "gpu") == "32-true"  # outside a Hydra run: as composed


def test_bf16_is_native_with_a_bf16_flag_and_measured_without_one():
    assert cpu_flags(AVX512_BF16) >= {"avx512_bf16", "avx512f"}
    assert "avx512_bf16" not in cpu_flags(NO_AVX512)

    def never():
        raise AssertionError("a CPU with a bf16 flag is not measured")

    assert cpu_bf16_support(cpu_flags(AVX512_BF16), measure=never) == (True, None)
    assert cpu_bf16_support({"amx_bf16", "amx_tile"}, measure=never) == (True, None)
    # no flag: the measurement decides (0.9 vs 120 GFLOP/s on the AMD without AVX-512)
    assert cpu_bf16_support(cpu_flags(NO_AVX512), measure=lambda: 0.9 / 120) == (False, 0.9 / 120)
    assert cpu_bf16_support(cpu_flags(NO_AVX512), measure=lambda: 1.2) == (True, 1.2)  # emulated well enough
    text = bf16_emulation_warning(0.9 / 120)
    assert "133x slower" in text and "precision=32" in text and "avx512_bf16" in text


def test_matmul_ratio_measures_this_cpu():
    """The real measurement on this machine (it has avx512_bf16: ~2.5x on one thread, less under load)."""
    ratio = matmul_ratio(n=256, repeats=2)
    assert 0 < ratio < 100
    native, _ = cpu_bf16_support(cpu_flags())
    assert native == bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}) or ratio >= 0.5


def test_console_line_says_devices_and_precision():
    assert describe({"accelerator": "gpu", "precision": "bf16-mixed", "devices": 1, "device_name": "NVIDIA H100",
                     "cuda_devices": 8}) == "devices: 1 x GPU (NVIDIA H100; 8 visible), precision bf16-mixed"
    assert describe({"accelerator": "gpu", "precision": "bf16-mixed", "devices": -1, "device_name": "NVIDIA H100",
                     "cuda_devices": 8}).startswith("devices: 8 x GPU")  # trainer.devices=-1: all of them
    assert describe({"accelerator": "cpu", "precision": "32-true", "devices": 1, "device_name": "AMD EPYC",
                     "cuda_devices": 0}) == "devices: CPU (AMD EPYC), precision 32-true"


H100 = {"available": True, "count": 8, "bf16": True, "name": "NVIDIA H100 80GB HBM3"}
NO_GPU = {"available": False, "count": 0, "bf16": False, "name": None}


def test_headline_command_on_a_gpu_node_trains_on_the_gpu_in_bf16(bases_without_building):
    """`model=opt1.3b peft=qlora strategy=zero3` composed as the CLI does, resolved with a GPU node's facts: gpu,
    bf16-mixed, and the strategy/PEFT rules accept it; on this machine's facts the same command stays CPU fp32."""
    from llmlab.checks.strategy import check_run
    from llmlab.distributed.devices import resolve_devices

    for facts, accelerator, precision in ((H100, "gpu", "bf16-mixed"), (NO_GPU, "cpu", "32-true")):
        cfg, _ = compose_resolved(["model=opt1.3b", "peft=qlora", "strategy=zero3"])
        assert cfg.trainer.accelerator == "auto" and cfg.trainer.precision == "32-true"
        line = describe(resolve_devices(cfg, "default", cfg.strategy.name, cuda=facts))
        assert (cfg.trainer.accelerator, cfg.trainer.precision) == (accelerator, precision)
        assert line.endswith(f"precision {precision}") and (("1 x GPU (NVIDIA H100" in line) == (facts is H100))
        check_run(cfg)
    # a named precision is kept on the GPU; strategy=cpu_bf16 stays on the CPU there
    cfg, _ = compose_resolved(["precision='32'"])
    resolve_devices(cfg, "32", "auto", cuda=H100)
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "32-true")
    cfg, _ = compose_resolved(["strategy=cpu_bf16"])
    resolve_devices(cfg, "bf16-mixed", "cpu_bf16", cuda=H100)
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("cpu", "bf16-mixed")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default job (FAST's few steps) through the CLI on this GPU-less machine."""
    return run_cli(tmp_path_factory.mktemp("devices") / "run", *FAST)


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_cpu_path_for_real_first_line_and_resolved_config(default_run):
    assert_ok(default_run)
    lines = [ln for ln in default_run.stdout.splitlines() if ln.strip()]
    assert re.fullmatch(r"devices: CPU \(.+\), precision 32-true", lines[0]), lines[:3]
    resolved = (default_run.dir / "config_resolved.yaml").read_text()
    assert re.search(r"^  accelerator: cpu$", resolved, re.M) and re.search(r"^  precision: 32-true$", resolved, re.M)
    assert "bf16" not in default_run.stdout + default_run.stderr  # no emulation warning at fp32

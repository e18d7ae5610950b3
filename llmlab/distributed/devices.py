"""What a run trains on, decided by llmlab before any check or weight: the accelerator (`trainer.accelerator=auto`,
the default: CUDA GPUs when torch sees one, else the CPU), the precision when the user chose none (`precision=default`:
32-true on the CPU, bf16-mixed on a GPU that has bf16, 16-mixed on an older one), the line the console prints
first, and whether this CPU computes bf16 natively or emulates it (then a warning with the measured ratio).

The decisions are plain functions of what they are told (`choose_accelerator`, `choose_precision`,
`cpu_bf16_support`), so tests run the GPU branch by its decision function on a CPU machine; `resolve_devices`
asks torch and /proc/cpuinfo and writes the answers into the run config (config_resolved.yaml shows them).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import open_dict

from llmlab.distributed.precision import half_dtype

# strategies that train on the CPU whatever the machine has (conf/strategy/<name>.yaml)
CPU_STRATEGIES = ("cpu_bf16",)
# /proc/cpuinfo flags of CPUs with bf16 matmul instructions (AVX512-BF16 dot products; AMX tiles)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# below this bf16/fp32 matmul speed ratio bf16 is called emulated (native: 1.5-7x fp32; emulated: ~1/100)
EMULATED_BELOW = 0.5


def choose_accelerator(requested: str, cuda_available: bool, device_count: int, strategy: str | None = None) -> str:
    """`trainer.accelerator` as Lightning gets it: `auto` becomes `gpu` when CUDA sees a GPU (and the strategy is
    not a CPU one, e.g. cpu_bf16), else `cpu`; any explicit choice is kept (the checks judge it)."""
    requested = str(requested or "auto").lower()
    if requested != "auto":
        return requested
    if strategy in CPU_STRATEGIES:
        return "cpu"
    return "gpu" if cuda_available and device_count > 0 else "cpu"


def choose_precision(choice: str | None, precision: str, accelerator: str, bf16_supported: bool = True) -> str:
    """`trainer.precision`: the precision group's `default` choice (the user named none) is 32-true on the CPU
    and bf16-mixed on a GPU (16-mixed where the GPU has no bf16, pre-Ampere); any named choice is kept."""
    if choice != "default" or accelerator not in ("gpu", "cuda"):
        return str(precision)
    return "bf16-mixed" if bf16_supported else "16-mixed"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is none: not Linux)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def matmul_ratio(n: int = 512, repeats: int = 3) -> float:
    """bf16 / fp32 speed of an n x n matmul on this CPU (>1: bf16 faster). ~0.1 s where bf16 is native; where it is
    emulated the bf16 matmul is ~100x slower, so n stays small (512: ~0.3 s emulated)."""
    def best(dtype) -> float:
        a = torch.randn(n, n).to(dtype)
        a @ a  # warm-up: oneDNN picks its kernel at the first call
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def cpu_bf16_support(flags: set[str], measure=None) -> tuple[bool, float | None]:
    """(native, bf16/fp32 matmul ratio or None). Native when the CPU has a bf16 flag (no measuring); without one,
    `measure()` (default `matmul_ratio`) decides: some CPUs emulate bf16 well enough, most ~100x slower."""
    if flags & set(BF16_FLAGS):
        return True, None
    ratio = (measure or matmul_ratio)()
    return ratio >= EMULATED_BELOW, ratio


def bf16_emulation_warning(ratio: float) -> str:
    return (f"this CPU has no native bf16 (no {' / '.join(BF16_FLAGS)} in /proc/cpuinfo): bf16 is emulated, and a "
            f"bf16 matmul measured {1 / ratio:.0f}x slower than fp32 here just now ({ratio:.3f}x fp32's speed); this "
            f"run will be that much slower. Fix: precision=32 (and strategy=auto instead of cpu_bf16)")


def cuda_facts() -> dict:
    """What torch sees: CUDA available, GPU count, bf16 support, the first GPU's name."""
    cuda = torch.cuda.is_available()
    return {"available": cuda, "count": torch.cuda.device_count() if cuda else 0,
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()), "name": torch.cuda.get_device_name(0) if cuda else None}


def resolve_devices(cfg, precision_choice: str | None, strategy: str | None = None, cuda: dict | None = None) -> dict:
    """Write `trainer.accelerator` and `trainer.precision` into `cfg` (in place) as `choose_*` decide with what
    torch sees (`cuda`: `cuda_facts()` unless given); returns what the console's first line states, with
    `warning` when a CPU run computes in bf16 on a CPU that emulates it (a warning, not a refusal: the run is correct, only slow, and a user may want exactly
    that, e.g. to check a bf16 recipe before a GPU run)."""
    cuda = cuda_facts() if cuda is None else cuda  # tests pass a GPU machine's facts (`cuda_facts()`'s keys)
    accelerator = choose_accelerator(cfg.trainer.get("accelerator", "auto"), cuda["available"], cuda["count"], strategy)
    precision = choose_precision(precision_choice, cfg.trainer.precision, accelerator, cuda["bf16"])
    with open_dict(cfg):
        cfg.trainer.accelerator = accelerator
        cfg.trainer.precision = precision
    on_gpu = accelerator in ("gpu", "cuda") and cuda["available"]
    facts = {"accelerator": accelerator, "precision": precision, "devices": cfg.trainer.get("devices", 1),
             "device_name": cuda["name"] if on_gpu else cpu_name(), "cuda_devices": cuda["count"]}
    if not on_gpu and half_dtype(precision) == "bfloat16":
        native, ratio = cpu_bf16_support(cpu_flags())
        facts["bf16_native"] = native
        if not native:
            facts["warning"] = bf16_emulation_warning(ratio)
    return facts


def cpu_name(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "CPU"


def describe(facts: dict) -> str:
    """The console's first line: where and in what precision this run trains."""
    n = facts["devices"]
    if str(n) in ("-1", "auto"):
        n = facts["cuda_devices"]
    elif hasattr(n, "__len__") and not isinstance(n, str):  # a list of GPU indices (a ListConfig too)
        n = len(n)
    where = (f"{n} x GPU ({facts['device_name']}; {facts['cuda_devices']} visible)"
             if facts["accelerator"] in ("gpu", "cuda") else f"CPU ({facts['device_name']})")
    return f"devices: {where}, precision {facts['precision']}"

"""The trainer and launcher rules: step counts and intervals, devices that must exist, the Slurm launcher
without -m, compile and the allocator switch (config alone, except `check_devices` and `check_compile`,
which ask torch at run time).
"""
from __future__ import annotations

from llmlab.distributed.detect import uses_cpu
from llmlab.errors import ConfigError


def check_devices(cfg) -> None:
    """The accelerator asked for must exist on this machine (checked at run time, not in validation)."""
    accelerator = str(cfg.trainer.accelerator)
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible here; use "
                              f"trainer.accelerator=cpu (with precision=bf16-mixed for speed on AMX CPUs)")


def check_launcher(cfg) -> None:
    """`launcher=slurm` acts on sweeps only: without -m Hydra would train here, silently."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import ListConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.runtime.choices.get("launcher") == "slurm" and hc.mode == RunMode.RUN and not os.environ.get("SLURM_JOB_ID"):
        raise ConfigError("launcher=slurm submits sweep jobs; without -m this run would train on this machine. "
                          "Add -m (one job is a sweep of one): python -m llmlab.run -m launcher=slurm ..., "
                          "or submit slurm/single_node.sbatch")
    # Several processes per job started by Lightning itself (no srun/torchrun) re-run the command line:
    # in a grid sweep the copies walk the same job list in step, but a search's copy would start a
    # second sweeper (asking its own trials) and the job would hang waiting for its other ranks.
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    n_proc = (len(devices) if isinstance(devices, (list, ListConfig)) else
              int(devices) if str(devices).isdigit() else 1) * (int(nodes) if str(nodes).isdigit() else 1)
    external = (int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 or "LOCAL_RANK" in os.environ
                or "TORCHELASTIC_RUN_ID" in os.environ)
    sweeper = str(hc.sweeper.get("_target_", ""))
    if hc.mode == RunMode.MULTIRUN and n_proc > 1 and not external and not sweeper.endswith("BasicSweeper"):
        raise ConfigError(f"trainer.devices={devices} in a search sweep ({sweeper.rsplit('.', 1)[-1]}) on this "
                          f"machine: Lightning would start the other processes by re-running the command, which "
                          f"starts the sweeper again. Run the search with launcher=slurm (srun starts one process "
                          f"per device), or with trainer.devices=1")


def check_compile_settings(cfg) -> None:
    """`compile` is a switch: a mode name or a string there would be read as "on" by Python's truth test."""
    value = cfg.get("compile", False)
    if not isinstance(value, bool):
        raise ConfigError(f"compile={value!r}: give compile=true (the model's forward through torch.compile, "
                          f"inductor) or compile=false")


def check_release_freed_memory(cfg) -> None:
    """`release_freed_memory` is a switch, and on needs glibc's mallopt (llmlab.distributed.memory.release_freed_memory)."""
    value = cfg.get("release_freed_memory", False)
    if not isinstance(value, bool):
        raise ConfigError(f"release_freed_memory={value!r}: give release_freed_memory=true (freed blocks back to "
                          f"the OS at once) or release_freed_memory=false")
    if value:
        from llmlab.distributed.memory import glibc

        if glibc() is None:
            raise ConfigError("release_freed_memory=true sets glibc's malloc options, and this system's C library "
                              "is not glibc (no mallopt): set release_freed_memory=false")


def check_compile(cfg) -> None:
    """`compile=true` needs what inductor needs, checked before weights load: without them the run fails at its
    first forward, after data and model are built, with a ~120-line traceback (measured with CXX=/nonexistent/g++:
    `InductorError: InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx`)."""
    if not cfg.get("compile"):
        return
    from torch._dynamo.eval_frame import check_if_dynamo_supported

    try:  # this Python (3.15+, free-threaded before 3.13.3) has no torch.compile
        check_if_dynamo_supported()
    except RuntimeError as err:
        raise ConfigError(f"compile=true: {err}; use compile=false") from None
    if not uses_cpu(cfg.trainer.get("accelerator")):
        return
    try:  # inductor's CPU kernels are C++ it compiles: the compiler it would use ($CXX, else g++)
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # noqa: BLE001: only its own "no compiler" error is a refusal
        if type(err).__name__ != "InvalidCxxCompiler":
            return
        raise ConfigError(f"compile=true: inductor's CPU kernels need a C++ compiler and none works here ({err}); "
                          f"install g++ or set CXX to one, or use compile=false") from None


def check_trainer(cfg) -> None:
    """trainer.max_steps / val_check_interval / devices: numbers Lightning would refuse mid-setup."""
    t = cfg.trainer
    steps = t.get("max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps > 0 or steps == -1):
        raise ConfigError(f"trainer.max_steps={steps!r}: give a number of optimizer steps >= 1 (or -1 with "
                          f"trainer.max_epochs=N), e.g. trainer.max_steps=100")
    vci = t.get("val_check_interval")
    if vci is not None and (isinstance(vci, bool) or not isinstance(vci, (int, float)) or vci <= 0):
        raise ConfigError(f"trainer.val_check_interval={vci!r}: give a step interval >= 1 (or a fraction of an "
                          f"epoch in (0, 1]), e.g. trainer.val_check_interval=100")
    for key in ("accumulate_grad_batches", "num_nodes"):
        v = t.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"trainer.{key}={v!r}: give an integer >= 1")

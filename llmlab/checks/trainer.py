"""The trainer group's rules (conf/trainer/default.yaml, and trainer.precision from the precision group): every
trainer setting typed and bounded (`check_trainer`, the TRAINER table), precision x device (`check_precision`:
fp16 needs a GPU), the devices that must exist (`check_devices`, asks torch), the Slurm launcher without -m
(`check_launcher`), and the machine's side of two top-level switches: compile=true needs inductor's C++
compiler (`check_compile`, asks torch), release_freed_memory=true needs glibc (`check_release_freed_memory`).
The switches' types themselves are top-level settings (settings.py).
"""
from __future__ import annotations

from llmlab.checks.settings import (
    count_or_fraction,
    integer,
    is_int,
    number,
    one_of,
    switch,
)
from llmlab.distributed.detect import surely_no_cuda, uses_cpu
from llmlab.distributed.memory import glibc
from llmlab.distributed.precision import PRECISIONS, half_dtype
from llmlab.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
CLIP_ALGORITHMS = ("norm", "value")


def _devices(value) -> None:
    """trainer.devices: a count >= 1, -1 (all), auto, a list of device indices, or Lightning's "0,1" text."""
    from omegaconf import ListConfig

    if is_int(value) and (value >= 1 or value == -1):
        return
    if isinstance(value, (list, ListConfig)) and value and all(is_int(i) and i >= 0 for i in value):
        return
    if isinstance(value, str) and (value == "auto" or value.strip() == "-1" or (
            value.replace(",", "").replace(" ", "").isdigit() and value.strip(", ") and value.strip() != "0")):
        return
    raise ConfigError(f"trainer.devices={value!r}: give a number of devices >= 1 (-1: all), auto, or a list of "
                      f"device indices, e.g. trainer.devices=2 or trainer.devices=[0,1]")


def _clip_value(value) -> None:
    """trainer.gradient_clip_val: a threshold >= 0 (0 or null: no clipping); Lightning trains unclipped on a
    negative one, silently."""
    if value is None:
        return
    x = number(value, "trainer.gradient_clip_val", "1.0")
    if not 0 <= x < float("inf"):
        raise ConfigError(f"trainer.gradient_clip_val={value!r}: give a clipping threshold >= 0 (0 or null: no "
                          f"clipping), e.g. trainer.gradient_clip_val=1.0")


def _val_check_interval(vci) -> None:
    if vci is None or (is_int(vci) and vci >= 1) or (isinstance(vci, float) and 0 < vci <= 1):
        return
    raise ConfigError(f"trainer.val_check_interval={vci!r}: give a step interval >= 1 (or a fraction of an "
                      f"epoch in (0, 1]), e.g. trainer.val_check_interval=100")


def _max_steps(steps) -> None:
    if not is_int(steps) or not (steps > 0 or steps == -1):
        raise ConfigError(f"trainer.max_steps={steps!r}: give a number of optimizer steps >= 1 (or -1 with "
                          f"trainer.max_epochs=N), e.g. trainer.max_steps=100")


def _precision(value) -> None:
    if isinstance(value, bool) or str(value) not in PRECISIONS:
        names = ", ".join(n for n in PRECISIONS if "-" in n)
        raise ConfigError(f"trainer.precision={value!r}: use one of {names} (precision=<name> picks the group "
                          f"file), e.g. precision=bf16-mixed")


# (key of conf/trainer/default.yaml, check of its value): every trainer setting llmlab or Lightning reads
TRAINER = (
    ("accelerator", lambda v: one_of(v, "trainer.accelerator", ACCELERATORS)),
    ("devices", _devices),
    ("num_nodes", lambda v: integer(v, "trainer.num_nodes", "1", 1)),
    ("precision", _precision),
    ("max_steps", _max_steps),
    ("max_epochs", lambda v: integer(v, "trainer.max_epochs", "3", 1, allow=(-1,), null=True)),
    ("val_check_interval", _val_check_interval),
    ("check_val_every_n_epoch", lambda v: integer(v, "trainer.check_val_every_n_epoch", "1", 1, null=True)),
    ("limit_val_batches", lambda v: count_or_fraction(v, "trainer.limit_val_batches", "10")),
    ("limit_train_batches", lambda v: count_or_fraction(v, "trainer.limit_train_batches", "1.0")),
    ("num_sanity_val_steps", lambda v: integer(v, "trainer.num_sanity_val_steps", "2", 0, allow=(-1,))),
    ("gradient_clip_val", _clip_value),
    ("gradient_clip_algorithm", lambda v: v is None or one_of(v, "trainer.gradient_clip_algorithm", CLIP_ALGORITHMS)),
    ("accumulate_grad_batches", lambda v: integer(v, "trainer.accumulate_grad_batches", "4", 1)),
    ("max_bad_steps", lambda v: integer(v, "trainer.max_bad_steps", "3", 1)),
    ("log_every_n_steps", lambda v: integer(v, "trainer.log_every_n_steps", "10", 1)),
    ("deterministic", lambda v: v == "warn" or switch(v, "trainer.deterministic")),
    ("enable_progress_bar", lambda v: switch(v, "trainer.enable_progress_bar")),
    ("enable_model_summary", lambda v: switch(v, "trainer.enable_model_summary")),
    ("use_distributed_sampler", lambda v: switch(v, "trainer.use_distributed_sampler")),
)


def check_trainer(cfg) -> None:
    """Every trainer setting typed and bounded (TRAINER): a value Lightning would refuse mid-setup, or
    take silently (a negative clip value trains unclipped), is one line here."""
    t = cfg.trainer
    for key, check in TRAINER:
        if key in t:
            check(t.get(key))


def check_precision(cfg, cuda_available: bool | None = None) -> None:
    """fp16 (16-mixed, 16-true) needs a GPU, whatever the strategy: on a CPU Lightning would swap 16-mixed for
    bf16-mixed with a warning, and DeepSpeed's CPU accelerator needs oneDNN fp16 kernels.

    With the config alone (`cuda_available=None`, in `check_settings`) trainer.accelerator=cpu is refused, and
    auto where no NVIDIA device exists (`surely_no_cuda`); `check_devices` asks again for trainer.accelerator=auto
    once torch says whether a CUDA GPU is visible."""
    precision, accelerator = str(cfg.trainer.precision), str(cfg.trainer.get("accelerator", "auto"))
    if cuda_available is None and accelerator == "auto" and surely_no_cuda():  # no torch needed to know
        cuda_available = False
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and cuda_available is False)
    if half_dtype(precision) == "float16" and on_cpu:
        where = "on CPU" if accelerator == "cpu" else "here (trainer.accelerator=auto and no CUDA GPU is visible)"
        raise ConfigError(f"precision={precision} (fp16 with loss scaling) needs a GPU; {where} use "
                          f"precision=bf16-mixed or precision=bf16-true (fast on AMX), or precision=32")


def check_devices(cfg) -> None:
    """The accelerator asked for must exist on this machine (checked at run time, not in validation); with
    trainer.accelerator=auto, the precision must suit what auto picks (`check_precision`)."""
    accelerator = str(cfg.trainer.accelerator)
    if accelerator == "auto":
        import torch

        check_precision(cfg, cuda_available=torch.cuda.is_available())
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


def check_release_freed_memory(cfg) -> None:
    """`release_freed_memory=true` needs glibc's mallopt (llmlab.distributed.memory.release_freed_memory); the
    switch's type is a top-level setting (settings.py)."""
    if cfg.get("release_freed_memory") is True:
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
    except Exception as err:  # noqa: BLE001 - only its own "no compiler" error is a refusal
        if type(err).__name__ != "InvalidCxxCompiler":
            return
        raise ConfigError(f"compile=true: inductor's CPU kernels need a C++ compiler and none works here ({err}); "
                          f"install g++ or set CXX to one, or use compile=false") from None

"""Config schema of the `llmlab_slurm` launcher (`hydra/launcher: llmlab_slurm`).

The fields are hydra-submitit-launcher's `submitit_slurm` ones; the resource fields are untyped
(`Any`) so they can interpolate the job's config (`tasks_per_node: ${trainer.devices}`) and get a
message from the launcher, not a schema error, when the value is not a number.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class LlmlabSlurmConf:
    _target_: str = "hydra_plugins.llmlab_slurm.launcher.LlmlabSlurmLauncher"
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    # resources of ONE job (resolved against each job's own config: they may differ between jobs)
    nodes: Any = 1
    tasks_per_node: Any = 1  # = trainer.devices: one process per device, ranks from Slurm
    gpus_per_node: Any = None  # "auto": tasks_per_node when `accelerator` is gpu/cuda, else none
    cpus_per_task: Any = None
    mem_gb: Any = None
    timeout_min: Any = 60
    name: str = "${hydra.job.name}"
    stderr_to_stdout: bool = False
    # Slurm options
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    comment: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    gres: Optional[str] = None
    cpus_per_gpu: Optional[int] = None
    gpus_per_task: Optional[int] = None
    mem_per_gpu: Optional[str] = None
    mem_per_cpu: Optional[str] = None
    # the job's trainer.accelerator, for gpus_per_node: auto (not an sbatch option)
    accelerator: Optional[str] = None
    # seconds before the time limit at which Slurm signals the job (see `signal`)
    signal_delay_s: int = 120
    # "USR1": Lightning's handler (checkpoint on every rank + requeue); "USR2": submitit's (requeue,
    # resume from the last periodic checkpoint)
    signal: str = "USR1"
    # times a job may be requeued after its time limit by submitit's own handler (signal: USR2)
    max_num_timeout: int = 3
    additional_parameters: Dict[str, Any] = field(default_factory=dict)
    array_parallelism: int = 256
    setup: Optional[List[str]] = None
    srun_args: Optional[List[str]] = None


ConfigStore.instance().store(group="hydra/launcher", name="llmlab_slurm", node=LlmlabSlurmConf,
                             provider="llmlab_slurm")

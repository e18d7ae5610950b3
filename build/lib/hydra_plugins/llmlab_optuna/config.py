"""Config schema of the ``llmlab_optuna`` sweeper, registered in Hydra's ConfigStore.

Hydra's plugin scan imports this module (and ``sweeper.py``); neither imports optuna.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class LlmlabOptunaSweeperConf:
    _target_: str = "hydra_plugins.llmlab_optuna.sweeper.LlmlabOptunaSweeper"
    # the sampler below is instantiated by the sweeper (seed shifted on resume), not by Hydra
    _recursive_: bool = False

    # "minimize" | "maximize", or a list of them for a multi-objective study (the task function
    # then returns a sequence of floats, one per direction).
    direction: Any = "minimize"
    # The PLANNED TOTAL of COMPLETE trials. Started again, the sweep runs only what is missing.
    n_trials: int = 20
    # Trials asked and launched together (one launcher.launch call). Parallelism is the
    # launcher's: the basic launcher runs a batch one after another, submitit in parallel.
    n_jobs: int = 1
    # Name of the study in the storage. Fixed, so the same command finds the same study.
    study_name: str = "llmlab"
    # null: a journal file <hydra.sweep.dir>/optuna_journal.log (JournalStorage).
    # A path without "://": a journal file at that path (relative paths: inside the sweep dir).
    # Anything with "://": an Optuna RDB URL (sqlite:///..., postgresql://..., mysql://...).
    storage: Optional[str] = None
    # Stop (with an error) once this many jobs failed in one invocation. null: n_trials.
    max_failures: Optional[int] = None
    # Trials a killed sweep left RUNNING are marked FAIL on restart; with this on, their params
    # are enqueued again so they are the first ones tried.
    retry_interrupted: bool = True
    # Any optuna sampler; `seed` (if any) is shifted by the number of trials already in the
    # study on resume, so a restarted sweep does not replay the same random samples.
    sampler: Dict[str, Any] = field(
        default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None}
    )
    # The search space: {override key: spec}. See _search_space.py for the syntax.
    params: Optional[Dict[str, Any]] = None


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="llmlab_optuna",
    node=LlmlabOptunaSweeperConf,
    provider="llmlab_optuna",
)

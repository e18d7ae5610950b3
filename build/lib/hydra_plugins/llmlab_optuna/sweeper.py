"""The Hydra Sweeper plugin class. Thin: the work is in ``_impl`` (imported lazily so that Hydra's
plugin scan, which runs at every app start, does not import optuna)."""

from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import LlmlabOptunaSweeperConf  # noqa: F401  (registers the config)


class LlmlabOptunaSweeper(Sweeper):
    def __init__(
        self,
        direction: Any = "minimize",
        n_trials: int = 20,
        n_jobs: int = 1,
        study_name: str = "llmlab",
        storage: Optional[str] = None,
        max_failures: Optional[int] = None,
        retry_interrupted: bool = True,
        sampler: Any = None,
        params: Any = None,
    ) -> None:
        from ._impl import LlmlabOptunaSweeperImpl

        self.impl = LlmlabOptunaSweeperImpl(
            direction=direction,
            n_trials=n_trials,
            n_jobs=n_jobs,
            study_name=study_name,
            storage=storage,
            max_failures=max_failures,
            retry_interrupted=retry_interrupted,
            sampler=sampler,
            params=params,
        )

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.impl.sweep(arguments)

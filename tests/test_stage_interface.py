"""The declared stage interface (llmlab/stages/interface.py): what train.py, the data module and
RunSummary read from a stage, and nothing else."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from llmlab.stages.interface import Stage, SummarySource


def test_every_stage_is_a_stage_and_declares_its_data_format():
    from hydra.utils import get_class

    from tests.conftest import CONF

    targets = {OmegaConf.select(OmegaConf.load(p), "stage.module._target_") for p in (CONF / "stage").glob("*.yaml")}
    assert len(targets - {None}) >= 6  # (orpo/simpo/kto files take dpo's module via defaults)
    for target in sorted(targets - {None}):
        cls = get_class(target)
        assert issubclass(cls, Stage), target
        assert isinstance(cls.data_format, str), target


def test_a_module_that_is_not_a_stage_is_refused_by_name():
    from llmlab.stages.build import stage_class
    from llmlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stage.module._target_=torch.nn.Linear: not an llmlab stage"):
        stage_class(OmegaConf.create({"module": {"_target_": "torch.nn.Linear"}}))


class _Manual(Stage):
    data_format = "prompt"

    def __init__(self, clip):
        super().__init__()
        self.automatic_optimization = False
        self.max_grad_norm = clip
        self.model = SimpleNamespace(config=SimpleNamespace(hidden_size=8))  # for DeepSpeed's "auto" sizes


def test_manual_optimization_clip_goes_to_deepspeed_explicitly():
    """ppo/grpo clip their own gradients, a no-op under DeepSpeed: train.build_strategy hands the stage's
    max_grad_norm to the engine's config; a value set in the strategy config wins."""
    from llmlab.train import build_strategy
    from tests.conftest import CONF, compose_group

    zero2 = compose_group("strategy", "zero2")
    assert build_strategy(zero2, _Manual(0.5)).config["gradient_clipping"] == 0.5
    assert "gradient_clipping" not in build_strategy(zero2, _Manual(None)).config
    auto = _Manual(0.5)
    auto.automatic_optimization = True  # Lightning fills it from trainer.gradient_clip_val
    assert "gradient_clipping" not in build_strategy(zero2, auto).config
    own = OmegaConf.merge(zero2, {"config_overrides": {"gradient_clipping": 2.0}})
    assert build_strategy(own, _Manual(0.5)).config["gradient_clipping"] == 2.0
    assert build_strategy(OmegaConf.load(CONF / "strategy" / "ddp.yaml"), _Manual(0.5)) is not None


def test_run_summary_asks_sources_once_callbacks_then_stage(tmp_path):
    from types import SimpleNamespace

    from llmlab.callbacks.summary import RunSummary

    class Guard:
        def summary_values(self, summary):
            return {"status": "diverged"}

    class Stg(Stage):
        data_format = "sft"

        def summary_values(self, summary):
            return {"val_accuracy": summary["val_accuracy_last"], "status_seen": summary["status"]}

    rs = RunSummary(tmp_path, {"stage": "rm"})
    rs.history = {"val/accuracy": [(0, 0.5), (4, 0.75)], "train/loss": [(1, 2.0), (4, 1.0)]}
    trainer = SimpleNamespace(global_step=4, world_size=1, is_global_zero=True, callbacks=[rs, Guard()])
    assert isinstance(Guard(), SummarySource) and not isinstance(object(), SummarySource)
    rs.on_fit_end(trainer, Stg())
    assert rs.written["val_accuracy"] == 0.75 and rs.written["status"] == "diverged"
    assert rs.written["status_seen"] == "diverged"  # the stage sees what callbacks added
    import json

    assert json.loads((tmp_path / "summary.json").read_text()) == rs.written

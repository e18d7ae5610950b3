"""The strategy builders' old home, kept so configs written before the regroup still compose: a run's
saved `config_resolved.yaml`, or a user's own `conf/strategy/*.yaml`, may name
`_target_: llmlab.strategies.<builder>`. The builders live in `llmlab/distributed/strategies.py`; llmlab's
own configs name them there. Nothing in llmlab imports this module."""
from llmlab.distributed.strategies import (
    CPUDeepSpeedStrategy,
    auto,
    cpu_bf16,
    ddp,
    deepspeed,
    fsdp,
)

__all__ = ["CPUDeepSpeedStrategy", "auto", "cpu_bf16", "ddp", "deepspeed", "fsdp"]

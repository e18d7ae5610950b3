"""Config-only rules of the DPO family (stage=dpo|kto|orpo|simpo): which loss goes with which stage and
which reference settings. No torch import (runs inside `checks.check_settings`, before weights load)."""
from __future__ import annotations

from llmlab.errors import ConfigError

REFERENCE_FREE = ("ORPOLoss", "SimPOLoss")  # losses that declare needs_reference = False
UNPAIRED = ("KTOLoss",)  # losses of labelled single examples (stage=kto's batches)


def _name(target) -> str:
    return str(target or "").rpartition(".")[2]


def check_preference_losses(cfg) -> None:
    module = cfg.stage.get("module") or {}
    loss, stage_module = _name((module.get("loss") or {}).get("_target_")), _name(module.get("_target_"))
    if stage_module not in ("DPOModule", "KTOModule"):
        return
    setting = "stage.module.loss._target_"
    if stage_module == "KTOModule":
        if loss and loss not in UNPAIRED:
            raise ConfigError(f"{setting}={loss} with stage={cfg.stage.name}: the kto stage feeds single labelled "
                              f"examples, {loss} needs preference pairs; use llmlab.losses.KTOLoss, or stage=dpo|orpo|simpo")
        if module.get("precompute_reference"):
            raise ConfigError("stage.module.precompute_reference=true with stage=kto: KTO's KL pairs are rebuilt in every "
                              "batch (prompt i with the completion of i-1), so they cannot be scored once; set it to false")
        if float(module.get("sft_weight") or 0):
            raise ConfigError(f"stage.module.sft_weight={module.sft_weight} with stage=kto: KTO has no NLL term; set it to 0")
        if int(cfg.data.get("batch_size") or 0) < 2:
            raise ConfigError(f"data.batch_size={cfg.data.get('batch_size')} with stage=kto: KTO estimates its KL "
                              f"reference point from mismatched pairs within a batch; use data.batch_size >= 2")
        return
    if loss in UNPAIRED:
        raise ConfigError(f"{setting}={loss} with stage={cfg.stage.name}: KTO takes unpaired labelled examples, "
                          f"this stage feeds preference pairs; use stage=kto")
    if loss in REFERENCE_FREE:
        if module.get("reference_model"):
            raise ConfigError(f"stage.module.reference_model={module.reference_model} with {loss}: the loss uses no "
                              f"reference model; leave reference_model unset, or use a reference-based loss (DPOLoss)")
        if module.get("precompute_reference"):
            raise ConfigError(f"stage.module.precompute_reference=true with {loss}: the loss uses no reference model; "
                              f"set it to false")


def check_kto_record(record: dict | None, data, path: str) -> None:
    """The first record of a stage=kto file: {prompt, completion, label} or a preference pair, before weights load
    (the format checks every record later, with the same message)."""
    from llmlab.data.sources import DataError

    if record is None:
        return
    completion, label = data.get("completion_field", "completion"), data.get("label_field", "label")
    if data.get("chosen_field", "chosen") in record and data.get("rejected_field", "rejected") in record:
        return
    if completion in record and record.get(label) is None:
        raise DataError(f"KTO data without labels: {path} has no data.label_field={label!r} (fields: {sorted(record)}); "
                        f"give each example a boolean label (true: desirable), or set data.label_field to the column "
                        f"that holds it")
    if completion not in record:
        raise DataError(f"stage=kto needs {{prompt, {completion}, {label}}} records or preference pairs, but {path} has "
                        f"fields {sorted(record)}; set data.completion_field / data.label_field")

"""Rules of the preference stages (rm, dpo, kto, orpo, simpo, ppo), before any weights load.

`check_preference_losses` (config only, no torch import: runs inside `checks.entry.check_settings`): which
loss goes with which stage and which reference settings. `check_preference` (in `checks.entry.check_config`):
the data files' fields, the reward model and reference model named (their configs and tokenizers).
"""
from __future__ import annotations

import json
from pathlib import Path

from llmlab.errors import ConfigError, DataError

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
        if module.get("split_pairs"):
            raise ConfigError("stage.module.split_pairs=true with stage=kto: it splits preference pairs into their "
                              "chosen and rejected halves, KTO's batches are single examples; set it to false")
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


def _first_record(path: Path) -> dict | None:
    """The first record of a .jsonl/.json file (cheap peek), else None."""
    try:
        if path.suffix == ".jsonl":
            with path.open() as f:
                line = next((ln for ln in f if ln.strip()), None)
            return json.loads(line) if line else None
        if path.suffix == ".json" and path.stat().st_size < 50_000_000:
            data = json.loads(path.read_text())
            rows = data if isinstance(data, list) else next((v for v in data.values() if isinstance(v, list)), [])
            return rows[0] if rows and isinstance(rows[0], dict) else None
    except (OSError, ValueError, StopIteration):
        return None
    return None


def _sequence_classifier_config(path: str, setting: str):
    """The config of a reward model (a run dir, HF dir or hub name); ConfigError unless it is a
    one-output sequence classifier."""
    from transformers import AutoConfig

    from llmlab.stages.alignment import hf_dir

    source = hf_dir(path)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{setting}={path}: no model config there ({err}); give a stage=rm run dir, its hf/ "
                          f"directory, or a hub name of a sequence classifier (needs internet)") from None
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"{setting}={path} is not a sequence classifier (architectures: {archs}); a reward "
                          f"model is what stage=rm exports (AutoModelForSequenceClassification, one output)")
    if getattr(config, "num_labels", 1) != 1:
        raise ConfigError(f"{setting}={path} has {config.num_labels} outputs; a reward model has one score")
    return config


def check_preference(cfg) -> None:
    """Rules of the preference stages (rm, dpo, ppo), before any weights load."""
    stage, data = cfg.stage, cfg.data
    module = stage.get("module") or {}
    if stage.name in ("rm", "dpo", "orpo", "simpo") and data.source == "text" and not cfg.dry_run:
        chosen, rejected = data.get("chosen_field", "chosen"), data.get("rejected_field", "rejected")
        for f in ([data.train_files] if isinstance(data.train_files, str) else list(data.train_files or [])):
            record = _first_record(Path(str(f)).expanduser())
            missing = [n for n in (chosen, rejected) if record is not None and n not in record]
            if missing:
                raise ConfigError(f"stage={stage.name} needs preference pairs, but {f} has no field(s) {missing} "
                                  f"(fields: {sorted(record)}); set data.chosen_field / data.rejected_field")
    if stage.name == "kto" and data.source == "text" and not cfg.dry_run:
        for f in ([data.train_files] if isinstance(data.train_files, str) else list(data.train_files or [])):
            check_kto_record(_first_record(Path(str(f)).expanduser()), data, str(f))
    if stage.name == "ppo":
        if not module.get("reward_model") and not module.get("rule_reward") and not cfg.get("reward"):
            raise ConfigError("stage=ppo has no reward source: set stage.reward_model=<stage=rm run dir or HF "
                              "path of a sequence classifier>, or stage.rule_reward=<function(response, "
                              "answer)>, e.g. llmlab.data.builtin.rule_reward with data=builtin")
        if module.get("reward_model"):
            _sequence_classifier_config(str(module.reward_model), "stage.reward_model")
        if int(cfg.trainer.get("accumulate_grad_batches") or 1) != 1:
            raise ConfigError("stage=ppo steps its optimizer per PPO mini-batch itself: set "
                              "trainer.accumulate_grad_batches=1 (use stage.module.mini_batch_size)")
        if int(module.get("mini_batch_size") or 1) < 1 or int(module.get("ppo_epochs") or 1) < 1:
            raise ConfigError("stage.module.mini_batch_size and stage.module.ppo_epochs must be >= 1")
        # several processes are fine: the KL coefficient and early stopping use all-rank means
        # (stages.common.mean_over_ranks); rollouts under ZeRO-3 generate on gathered weights
    if stage.name in ("dpo", "ppo", "kto") and module.get("reference_model"):
        from llmlab.models.build import build_tokenizer
        from llmlab.stages.alignment import check_same_tokenizer, hf_dir

        check_same_tokenizer(hf_dir(str(module.reference_model)), build_tokenizer(cfg.model),
                             "stage.module.reference_model")

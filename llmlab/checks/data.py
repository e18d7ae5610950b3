"""The data group's rules (config alone): every size, count and fraction typed and bounded (the DATA table),
the source and packing names, field names, local files, the prompt template, and the block size against the
model's positions.
"""
from __future__ import annotations

from omegaconf import open_dict

from llmlab.checks.model import local_config, model_positions
from llmlab.checks.settings import in_range, integer, one_of, switch
from llmlab.data.sources import SAMPLE_BY, check_files
from llmlab.errors import ConfigError

SOURCES = ("builtin", "text", "hub")
DEFAULT_BLOCK = 1024  # data.block_size=null: the model's positions, at most this (an 8k-position model would pack
# 8k-token rows on a first try: a cost a user should choose); and this when the positions are unknown offline
RECORD_FORMATS = ("auto", "prompt_response", "alpaca", "chat")

# (key of conf/data/*.yaml, check of its value, when the key is there)
DATA = (
    ("source", lambda v: one_of(v, "data.source", SOURCES)),
    ("block_size", lambda v: integer(v, "data.block_size", "512", 1, null=True)),
    ("batch_size", lambda v: integer(v, "data.batch_size", "8", 1, null=True)),
    ("val_batch_size", lambda v: integer(v, "data.val_batch_size", "8", 1, null=True)),
    ("n_train", lambda v: integer(v, "data.n_train", "20000", 1)),
    ("n_val", lambda v: integer(v, "data.n_val", "200", 1)),
    ("num_workers", lambda v: integer(v, "data.num_workers", "2", 0)),
    ("seed", lambda v: integer(v, "data.seed", "0", 0)),
    ("streaming", lambda v: switch(v, "data.streaming", "read the dataset as a stream")),
    ("pack_examples", lambda v: switch(v, "data.pack_examples", "several examples per row")),
    ("record_format", lambda v: one_of(v, "data.record_format", RECORD_FORMATS)),
    ("sample_by", lambda v: one_of(v, "data.sample_by", SAMPLE_BY)),
    ("holdout", lambda v: v is None or one_of(v, "data.holdout", ("random", "tail"))),
    ("num_proc", lambda v: integer(v, "data.num_proc", "4", 1, null=True)),
)


def fill_block_size(cfg) -> None:
    """data.block_size=null -> the model's positions (at most DEFAULT_BLOCK), so `data=text` works with any
    model as it is. Called before the checks and before the run config is saved (resume compares the number)."""
    if "data" in cfg and "block_size" in cfg.data and cfg.data.block_size is None:
        positions = model_positions(cfg.model) if "model" in cfg else None
        with open_dict(cfg):
            cfg.data.block_size = min(positions or DEFAULT_BLOCK, DEFAULT_BLOCK)


def _val_fraction_used(d) -> bool:
    """Whether data.val_fraction splits the training records (llmlab.data.sources.load_split): local files
    without val_files, a hub split without val_split that is not streamed."""
    if d.get("source") == "text":
        return not d.get("val_files")
    if d.get("source") == "hub":
        return not d.get("val_split") and not d.get("streaming")
    return False


def check_data_numbers(cfg) -> None:
    """Every data size, count, fraction and switch (DATA, data.val_fraction)."""
    d = cfg.data
    for key, check in DATA:
        if key in d:
            check(d.get(key))
    if d.get("val_fraction") is not None:
        if _val_fraction_used(d):
            in_range(d.val_fraction, "data.val_fraction", "0.05", 0, 1, low_open=True, high_open=True)
        else:
            in_range(d.val_fraction, "data.val_fraction", "0.05", 0, 1, high_open=True)

FIELD_KEYS = ("text_field", "prompt_field", "response_field", "instruction_field", "input_field", "output_field",
              "messages_field", "chosen_field", "rejected_field")


def check_data_settings(cfg) -> None:
    """The data group: numbers (`check_data_numbers`), local files, packing, field names, the prompt template,
    the block size against the model's positions."""
    d, stage = cfg.data, cfg.stage.name
    check_data_numbers(cfg)
    if d.get("source") == "text" and not cfg.get("dry_run"):  # local files exist, readable types
        check_files(d.get("train_files"), "data.train_files")
        if d.get("val_files"):
            check_files(d.val_files, "data.val_files")
    if d.get("holdout") == "tail" and (stage != "pretrain" or d.get("source") != "text"):
        raise ConfigError(f"data.holdout=tail (the last tokens of local text) is for stage=pretrain on data=text "
                          f"(here stage={stage}, data.source={d.get('source')}); use data.holdout=random")
    if d.get("packing") not in (None, "document", "concat"):
        raise ConfigError(f"data.packing={d.packing!r}: use document or concat")
    for key in FIELD_KEYS:
        if key in d and (d.get(key) is None or str(d.get(key)).strip() == ""):
            raise ConfigError(f"data.{key} is null: name the record field to read, e.g. data.{key}="
                              f"{key.removesuffix('_field')}")
    template = d.get("prompt_template")
    if stage != "pretrain" and template is not None:
        check_template_text(str(template), "data.prompt_template")
    positions = model_positions(cfg.model)
    if not cfg.get("dry_run") and positions is not None and isinstance(d.get("block_size"), int) \
            and d.block_size > positions:
        source = f"model.pretrained={cfg.model.pretrained}" if local_config(cfg.model) else f"model={cfg.model.name}"
        raise ConfigError(f"data.block_size={d.block_size} exceeds the model's {positions} positions "
                          f"({source}); lower data.block_size to at most {positions}")


def check_template_text(template: str, setting: str) -> None:
    """A prompt template: one `{prompt}` placeholder; any other brace must be doubled ({{ and }})."""
    example = f"{setting}='Question: {{prompt}}\\n\\nAnswer: '"
    if "{prompt}" not in template:
        raise ConfigError(f"{setting}={template!r} has no {{prompt}} placeholder; e.g. {example}")
    try:
        template.format(prompt="")
    except (KeyError, ValueError, IndexError, AttributeError) as err:
        raise ConfigError(f"{setting}={template!r}: braces other than {{prompt}} must be doubled to be literal "
                          f"({{{{ and }}}}), e.g. 'JSON {{{{\"q\": {{prompt}}}}}}' "
                          f"({type(err).__name__}: {err})") from None

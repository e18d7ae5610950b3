"""The data node's rules: sizes, packing, field names, local files, the prompt template, and the block size
against the model's positions.
"""
from __future__ import annotations

from llmlab.checks.model import local_config, model_positions
from llmlab.errors import ConfigError

FIELD_KEYS = ("text_field", "prompt_field", "response_field", "instruction_field", "input_field", "output_field",
              "messages_field", "chosen_field", "rejected_field")


def check_data_settings(cfg) -> None:
    """Sizes, field names and the prompt template of the data node."""
    d, stage = cfg.data, cfg.stage.name
    for key in ("block_size", "batch_size"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"data.{key}={v!r}: give an integer >= 1")
    if d.get("source") == "text" and not cfg.get("dry_run"):  # local files exist, readable types
        from llmlab.data.sources import check_files

        check_files(d.get("train_files"), "data.train_files")
        if d.get("val_files"):
            check_files(d.val_files, "data.val_files")
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

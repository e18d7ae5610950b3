"""Export a trained model: the PEFT adapter alone and a standalone merged model, both in HF format.

    python -m llmlab.export RUN_DIR [--out DIR] [--ckpt PATH] [--dtype bfloat16]
    python -m llmlab.export ADAPTER_DIR --out DIR [--base PATH_OR_HUB_NAME]
    python -m llmlab.export RUN_DIR quantize=int8            (also: HF_MODEL_DIR quantize=int8 --out DIR)
    python -m llmlab.export RUN_DIR format=gguf quantize=f16|q8_0|q4_k_m   (also: HF_MODEL_DIR ... --out DIR)

RUN_DIR is a run's output directory: the model is rebuilt from its `config_resolved.yaml` and the
trained weights are read from `--ckpt` (default: the newest intact checkpoint of the run, as
`resume=auto` picks it; so a run stopped before its end can be exported too; DeepSpeed and sharded
FSDP directories are gathered into full weights), else from its `hf_adapter/`. Writes
`<out>/adapter` (PEFT runs only) and `<out>/merged` (default out: `<RUN_DIR>/export`), each written
as `<dir>.partial` and renamed into place when complete. ADAPTER_DIR is a PEFT adapter directory
(with adapter_config.json); it is merged into its base model (`--base`, default the adapter's
`base_model_name_or_path`).

What is merged: the adapter's update is folded into the base weights with PEFT's own merge (LoRA,
DoRA, IA3). For QLoRA the base is first de-quantized (NF4 -> `--dtype`, default the 4-bit compute
dtype): the merged model computes what the trained (quantized base + adapter) model computed, up to
rounding. Prefix and prompt tuning have nothing to merge (their virtual tokens are inputs): only the
adapter is written, loadable with `peft.AutoPeftModelForCausalLM.from_pretrained` (llmlab.generate
does this).

`quantize=int8` (or `--quantize int8`) also writes `<out>/quantized-int8`: the merged model with int8
weights for CPU deployment (llmlab.models.quantize: what is quantized, why that library, the format), loaded
back with `from llmlab.models.quantize import load_quantized; model = load_quantized(DIR)`; its size on disk is
printed against the unquantized export's. An HF model directory (config.json) is quantized directly.

`format=gguf` (or `--format gguf`) also writes `<out>/gguf-<quant>/`: the merged model converted by llama.cpp's
own converter to `model.gguf` (tokenizer and chat template in its metadata; `quantize=` takes llama.cpp's
names f16 (default), q8_0, q4_k_m) and an Ollama `Modelfile` beside it (llmlab.models.gguf: which converter,
why, what the Modelfile carries). Needs llama-cpp-python and its converter (`pip install 'llmlab[gguf]'`;
scripts/setup.sh installs both). A run without checkpoints is converted from its `hf/`.

The run's own `hf/` (written by llmlab.callbacks.export.HFExport at the end of training) is the same
merged model, and `hf_adapter/` the adapter.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from llmlab.checkpointing.checkpoints import (
    checkpoint_problem,
    find_resume_checkpoint,
    load_weights,
)
from llmlab.checks.hub import hub_error
from llmlab.errors import ConfigError, fail
from llmlab.models.export import export_model
from llmlab.models.gguf import (
    FORMATS,
    QUANTS,
    ConversionFailed,
    check_family,
    check_installed,
    check_quant,
    convert,
)
from llmlab.models.peft import import_peft
from llmlab.models.quantize import (
    check_method,
    dir_size,
    human,
    quantize_int8,
    save_quantized,
)

log = logging.getLogger("llmlab")


def _load_run(run_dir: Path, ckpt: Path | None):
    """Rebuild a run's model from config_resolved.yaml and load its trained weights."""
    # lazy (OmegaConf; torch, transformers, lightning below): `check_args` answers before they load
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    if ckpt is None:  # the newest intact checkpoint (last.ckpt, or its .partial/.prev when that is torn)
        ckpt = find_resume_checkpoint(run_dir) or run_dir / "checkpoints" / "last.ckpt"
    elif ckpt.exists() and (problem := checkpoint_problem(ckpt)):
        raise ConfigError(f"--ckpt {ckpt}: not a Lightning checkpoint llmlab can read (incomplete or corrupt: "
                          f"{problem}); pass an intact one, "
                          f"e.g. checkpoints/last.ckpt.prev")
    state = None
    if ckpt.is_file() or ckpt.is_dir():
        # read (safely: weights_only, DeepSpeed shards scanned first) before the model is built, so a
        # wrong file fails in seconds: a file, a DeepSpeed directory (shards gathered here) or sharded FSDP
        try:
            state = load_weights(ckpt)
        except ConfigError as err:  # name the argument the user gave
            raise ConfigError(f"--ckpt {err}") from None
    # lazy: lightning, transformers only once the weights are readable
    from llmlab.models.build import build_tokenizer
    from llmlab.stages.build import build_stage

    tokenizer = build_tokenizer(cfg.model)
    module = build_stage(cfg, tokenizer)
    if state is not None:
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        missing = trainable - set(state)
        if missing:
            raise ConfigError(f"--ckpt {ckpt} lacks {len(missing)} trained tensors (e.g. {sorted(missing)[0]}): it is "
                              f"not a checkpoint of this run; pass this run's checkpoint")
        module.load_state_dict({k: v for k, v in state.items() if k in trainable}, strict=False)
        log.info("export: weights from %s", ckpt)
        return module.model, tokenizer
    adapter = run_dir / "hf_adapter"
    if (adapter / "adapter_config.json").is_file():
        model = import_peft().PeftModel.from_pretrained(module.model.get_base_model(), str(adapter))
        log.info("export: adapter from %s", adapter)
        return model, tokenizer
    raise ConfigError(f"{run_dir} has neither {ckpt} nor hf_adapter/; pass --ckpt PATH")


def _load_adapter(adapter_dir: Path, base: str | None, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: see _load_run

    base = base or json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir}/adapter_config.json names no base model; pass --base PATH_OR_HUB_NAME")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=False)
        tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise hub_error("--base", base, err) from None
    return import_peft().PeftModel.from_pretrained(model, str(adapter_dir)), tokenizer


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `llmlab: error:` line (exit 2), like every llmlab entry point."""

    def error(self, message):
        fail(f"{message} (usage: {' '.join(self.format_usage().split()).removeprefix('usage: ')})")


def _run_model_config(run_dir: Path) -> dict | None:
    """The run's model config as far as it is known without building it (for the GGUF family check):
    hf/config.json, else the scratch config's model_type, else a local pretrained dir's config.json."""
    import json

    if (run_dir / "hf" / "config.json").is_file():
        return json.loads((run_dir / "hf" / "config.json").read_text())
    from omegaconf import OmegaConf

    model = OmegaConf.load(run_dir / "config_resolved.yaml").model
    if model.get("init") == "scratch" and model.get("config") is not None:
        return {"model_type": model.config.get("model_type")}
    local = Path(str(model.get("pretrained") or "")).expanduser()
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text())
    return None  # a hub name: checked on the merged model, still before conversion


def _gguf_source(run_dir: Path, ckpt: Path | None) -> str:
    """'ckpt' when the run has weights to rebuild from (a checkpoint or hf_adapter/), 'hf' when only its
    merged hf/ is there; ConfigError when it has nothing to export."""
    if ckpt is not None or find_resume_checkpoint(run_dir) or (run_dir / "checkpoints" / "last.ckpt").exists() \
            or (run_dir / "hf_adapter" / "adapter_config.json").is_file():
        return "ckpt"
    if (run_dir / "hf" / "config.json").is_file():
        return "hf"
    raise ConfigError(f"{run_dir}: a run without an export: no checkpoint, hf/ or hf_adapter/ to convert (did "
                      f"training finish?); pass --ckpt PATH or train it to the end")


def check_gguf_args(args, kind: str) -> None:
    """format=gguf: the type, llama-cpp-python and its converter, the model family, the run's weights; all
    before any work."""
    check_quant(args.quantize)
    if kind == "run":
        _gguf_source(args.path, args.ckpt)
    where = check_installed()
    config = None
    if kind == "model":
        config = json.loads((args.path / "config.json").read_text())
    elif kind == "run":
        config = _run_model_config(args.path)
    else:
        base = args.base or json.loads((args.path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base and (Path(base) / "config.json").is_file():
            config = json.loads((Path(base) / "config.json").read_text())
    if config is not None:
        check_family(config, where)


def check_args(args) -> str:
    """What the arguments point at ('run' or 'adapter'), checked before torch loads; ConfigError else."""
    path = args.path
    if args.format not in FORMATS:
        raise ConfigError(f"format={args.format}: unknown export format; use one of {', '.join(FORMATS)} "
                          f"(gguf: llama.cpp / Ollama)")
    gguf = args.format == "gguf"
    if gguf and args.quantize is None:
        args.quantize = "f16"
    if gguf and args.quantize not in QUANTS:
        check_quant(args.quantize)
    if not path.exists():
        raise ConfigError(f"{path}: no such directory; give a run directory or a PEFT adapter directory")
    kind = ("run" if (path / "config_resolved.yaml").is_file() else
            "adapter" if (path / "adapter_config.json").is_file() else
            "model" if (path / "config.json").is_file() and args.quantize else None)
    if args.quantize and not gguf:
        if args.quantize in QUANTS:
            raise ConfigError(f"quantize={args.quantize} is a GGUF type: add format=gguf (format=hf takes quantize=int8)")
        check_method(args.quantize)
    if kind is None:
        raise ConfigError(f"{path}: neither a run directory (config_resolved.yaml) nor an adapter "
                          f"(adapter_config.json){'' if args.quantize else ' (an HF model directory only with quantize=int8)'}")
    if kind == "model" and args.out is None:
        raise ConfigError(f"{path} is an HF model directory: give --out DIR for "
                          f"{'gguf' if gguf else 'quantized'}-{args.quantize}/")
    if kind == "adapter" and args.out is None:
        raise ConfigError(f"{path} is an adapter directory: give --out DIR for the merged model")
    if kind == "run" and args.base is not None:
        raise ConfigError("--base is for an adapter directory; a run directory rebuilds its own base model")
    if args.ckpt is not None and kind in ("adapter", "model"):
        raise ConfigError(f"--ckpt is for a run directory; an {kind} directory has its weights")
    if args.base is not None and kind == "model":
        raise ConfigError("--base is for an adapter directory; an HF model directory is the model")
    if args.ckpt is not None and not (args.ckpt.is_file() or args.ckpt.is_dir()):
        raise ConfigError(f"--ckpt {args.ckpt}: no such checkpoint file (or DeepSpeed checkpoint directory)")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory for merged/ and adapter/")
    if gguf:
        check_gguf_args(args, kind)
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m llmlab.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a run directory, or a PEFT adapter directory")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/export)")
    parser.add_argument("--ckpt", type=Path, default=None, help="Lightning checkpoint (default checkpoints/last.ckpt)")
    parser.add_argument("--base", default=None, help="base model for an adapter directory")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the merged weights (default: as trained; QLoRA: its compute dtype)")
    parser.add_argument("--quantize", default=None, metavar="int8",
                        help="also write <out>/quantized-int8 for CPU deployment (same as quantize=int8); with "
                             "format=gguf: f16 (default), q8_0 or q4_k_m")
    parser.add_argument("--format", default="hf", metavar="hf|gguf",
                        help="gguf: also write <out>/gguf-<quantize>/ (model.gguf + Ollama Modelfile) with "
                             "llama.cpp's converter (same as format=gguf)")
    argv = sys.argv[1:] if argv is None else list(argv)
    # Hydra-style `quantize=int8` / `format=gguf`, as the other entry points take settings
    argv = [a for item in argv for a in ([f"--{item.split('=', 1)[0]}", item.split("=", 1)[1]]
                                         if item.startswith(("quantize=", "format=")) else [item])]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        kind = check_args(args)
        import torch  # lazy: see _load_run

        dtype = getattr(torch, args.dtype) if args.dtype else None
        path = args.path
        if kind == "model":
            if args.format == "gguf":
                return _gguf(path, args.out / f"gguf-{args.quantize}", args.quantize)
            return _quantize(path, None, args.out / f"quantized-{args.quantize}", args.quantize)
        if kind == "run" and args.format == "gguf" and _gguf_source(path, args.ckpt) == "hf":
            log.info("export: %s has no checkpoint; converting its hf/", path)
            return _gguf(path / "hf", (args.out or path / "export") / f"gguf-{args.quantize}", args.quantize)
        if kind == "run":
            model, tokenizer = _load_run(path, args.ckpt)
            out = args.out or path / "export"
        else:
            model, tokenizer = _load_adapter(path, args.base, dtype)
            out = args.out
    except ConfigError as err:
        fail(err)
    result = export_model(model, tokenizer, out / "merged", out / "adapter", dtype)
    for kind, where in result.items():
        if where:
            print(f"{kind}: {where}")
    if args.quantize:
        if result["merged"] is None:
            fail(f"quantize={args.quantize}: {args.path} has no merged model (prefix/prompt tuning: virtual tokens "
                 f"only); quantize a full or LoRA-family run")
        if args.format == "gguf":
            return _gguf(Path(result["merged"]), out / f"gguf-{args.quantize}", args.quantize)
        return _quantize(Path(result["merged"]), tokenizer, out / f"quantized-{args.quantize}", args.quantize)
    return 0


def _quantize(model_dir: Path, tokenizer, out: Path, method: str) -> int:
    """Quantize the exported model in `model_dir` into `out`; print where, the load call and the sizes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: see _load_run

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=False)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        weights = [f for f in model_dir.iterdir() if f.suffix in (".safetensors", ".bin")]
        reference = {f"export_{dtype}_on_disk": sum(f.stat().st_size for f in weights),
                     "fp32_params": 4 * n_params, "bf16_params": 2 * n_params}
        model, info = quantize_int8(model)
    except ConfigError as err:
        fail(err)
    summary = save_quantized(model, info, tokenizer, out, reference)
    print(f"quantized: {out}")
    print(f"load with: {summary['load']}")
    print(f"size: {human(summary['size_bytes'])} int8 weights vs {human(reference[f'export_{dtype}_on_disk'])} "
          f"for the {dtype} export ({model_dir}); parameters alone: fp32 {human(reference['fp32_params'])}, "
          f"bf16 {human(reference['bf16_params'])}")
    return 0


def _gguf(model_dir: Path, out: Path, quant: str) -> int:
    """Convert the exported model in `model_dir` to GGUF in `out` (llmlab.models.gguf); print where and how big."""
    try:
        summary = convert(model_dir, out, quant)
    except ConfigError as err:
        fail(err)
    except ConversionFailed as err:
        fail(err, code=1)
    print(f"gguf: {summary['file']} ({human(summary['size_bytes'])} {quant} vs {human(dir_size(model_dir))} "
          f"for {model_dir})")
    print(f"ollama: {summary['ollama']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a trained model: the PEFT adapter alone and a standalone merged model, both in HF format.

    python -m llmlab.export RUN_DIR [--out DIR] [--ckpt PATH] [--dtype bfloat16]
    python -m llmlab.export ADAPTER_DIR --out DIR [--base PATH_OR_HUB_NAME]
    python -m llmlab.export RUN_DIR quantize=int8            (also: HF_MODEL_DIR quantize=int8 --out DIR)

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
weights for CPU deployment (llmlab.quantize: what is quantized, why that library, the format), loaded
back with `from llmlab.quantize import load_quantized; model = load_quantized(DIR)`; its size on disk is
printed against the unquantized export's. An HF model directory (config.json) is quantized directly.

The run's own `hf/` (written by llmlab.callbacks.export.HFExport at the end of training) is the same
merged model, and `hf_adapter/` the adapter.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from llmlab.errors import ConfigError, fail

log = logging.getLogger("llmlab")


def _base_tensor(module_tensor, module=None):
    """A base weight as a plain tensor; bitsandbytes 4-bit and 8-bit (LLM.int8) weights are de-quantized."""
    if type(module_tensor).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(module_tensor.data, module_tensor.quant_state)
    if type(module_tensor).__name__ == "Int8Params":
        # int8 (out, in) with one absmax per row (SCB, on the weight or the layer's state): W = q * SCB / 127
        scb = module_tensor.SCB if getattr(module_tensor, "SCB", None) is not None else module.state.SCB
        return module_tensor.data.float() * scb.float()[:, None] / 127.0
    return module_tensor.detach()


def _is_conv1d(model, module_name: str) -> bool:
    """True when `module_name` in `model` is transformers' Conv1D (GPT-2's (in, out) linear layers)."""
    from transformers.pytorch_utils import Conv1D

    try:
        return isinstance(model.get_submodule(module_name), Conv1D)
    except AttributeError:
        return False


def plain_base_model(peft_model, dtype=None):
    """A new, unwrapped copy of the PEFT model's base: original module names, adapters left out,
    4-bit weights de-quantized. The PEFT model itself is not changed."""
    import copy

    import torch

    base = peft_model.get_base_model()
    config = copy.deepcopy(base.config)
    quantized = hasattr(config, "quantization_config")
    if quantized:
        compute = getattr(base, "hf_quantizer", None)
        compute = compute.quantization_config if compute is not None else None
        eight_bit = bool(getattr(compute, "load_in_8bit", False))  # LLM.int8: computes in fp32 / fp16
        compute = torch.float32 if eight_bit else (compute.bnb_4bit_compute_dtype if compute is not None else torch.bfloat16)
        dtype = dtype or compute
        del config.quantization_config
    with torch.device("meta"):
        plain = type(base)._from_config(config)
    source = dict(base.named_parameters(remove_duplicate=False))  # tied weights under both names
    source.update(dict(base.named_buffers(remove_duplicate=False)))
    state = {}
    for key, meta in list(plain.state_dict(keep_vars=True).items()):
        head, _, leaf = key.rpartition(".")
        candidates = (key, f"{head}.base_layer.{leaf}", f"{head}.original_module.{leaf}")
        found = next((c for c in candidates if c in source), None)
        if found is None:
            raise KeyError(f"export: no base tensor for {key!r}")
        four_bit = type(source[found]).__name__ in ("Params4bit", "Int8Params")
        owner = found.rpartition(".")[0]
        tensor = _base_tensor(source[found], base.get_submodule(owner) if four_bit else None)
        if four_bit and leaf == "weight" and _is_conv1d(plain, head):
            # bitsandbytes holds GPT-2's Conv1D (in, out) weights as Linear4bit/8bitLt (out, in): de-quantized
            # they come back transposed (square ones too, so the shape alone cannot tell)
            tensor = tensor.t()
        tensor = tensor.reshape(meta.shape)  # 4-bit storage is flat (N*K/2, 1) until de-quantized
        state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor.clone()
    plain.load_state_dict(state, assign=True, strict=True)
    for key, buf in list(plain.named_buffers()):  # non-persistent buffers (e.g. RoPE inv_freq)
        if buf.is_meta:
            owner, _, leaf = key.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, source[key].clone(), persistent=False)
    plain.tie_weights()
    return plain.eval()


def merged_model(peft_model, adapter_dir: Path, dtype=None):
    """A standalone model: the (de-quantized) base with the adapter saved in `adapter_dir` merged in."""
    from llmlab.peft import import_peft

    peft = import_peft()
    base = plain_base_model(peft_model, dtype)
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.eval()


def can_merge(peft_model) -> bool:
    return not bool(getattr(peft_model.active_peft_config, "is_prompt_learning", False))


def save_adapter(peft_model, tokenizer, out: Path) -> None:
    peft_model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def save_merged(peft_model, tokenizer, adapter_dir: Path, out: Path, dtype=None) -> None:
    """Write the merged standalone model (+ tokenizer); loadable with AutoModelForCausalLM."""
    model = merged_model(peft_model, adapter_dir, dtype)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def export_model(model, tokenizer, merged_dir: Path, adapter_dir: Path | None = None, dtype=None) -> dict:
    """Export an in-memory model: full fine-tuning -> `merged_dir`; PEFT -> adapter + merged.

    Returns {"merged": path or None, "adapter": path or None}.
    """
    from llmlab.peft import is_peft_model

    from llmlab.atomic import atomic_dir

    # each directory is written as <dir>.partial and renamed into place when complete (a kill -9
    # mid-export leaves the previous export, never a torn one)
    merged_dir = Path(merged_dir)
    if not is_peft_model(model):
        with atomic_dir(merged_dir) as tmp:
            model.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return {"merged": str(merged_dir), "adapter": None}
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else merged_dir.with_name(merged_dir.name + "_adapter")
    with atomic_dir(adapter_dir) as tmp:
        save_adapter(model, tokenizer, tmp)
    if not can_merge(model):
        log.info("export: %s has nothing to merge (virtual tokens); adapter only: %s",
                 model.active_peft_config.peft_type, adapter_dir)
        return {"merged": None, "adapter": str(adapter_dir)}
    with atomic_dir(merged_dir) as tmp:
        save_merged(model, tokenizer, adapter_dir, tmp, dtype)
    return {"merged": str(merged_dir), "adapter": str(adapter_dir)}


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _load_run(run_dir: Path, ckpt: Path | None):
    """Rebuild a run's model from config_resolved.yaml and load its trained weights."""
    from omegaconf import OmegaConf

    from llmlab.checkpoints import checkpoint_problem, find_resume_checkpoint, load_weights

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
    from llmlab.builder import build_stage  # lightning, transformers: only once the weights are readable
    from llmlab.models import build_tokenizer

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
        from llmlab.peft import import_peft

        model = import_peft().PeftModel.from_pretrained(module.model.get_base_model(), str(adapter))
        log.info("export: adapter from %s", adapter)
        return model, tokenizer
    raise ConfigError(f"{run_dir} has neither {ckpt} nor hf_adapter/; pass --ckpt PATH")


def _load_adapter(adapter_dir: Path, base: str | None, dtype):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab.peft import import_peft

    base = base or json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir}/adapter_config.json names no base model; pass --base PATH_OR_HUB_NAME")
    from llmlab.hub import hub_error

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


def check_args(args) -> str:
    """What the arguments point at ('run' or 'adapter'), checked before torch loads; ConfigError else."""
    path = args.path
    if not path.exists():
        raise ConfigError(f"{path}: no such directory; give a run directory or a PEFT adapter directory")
    kind = ("run" if (path / "config_resolved.yaml").is_file() else
            "adapter" if (path / "adapter_config.json").is_file() else
            "model" if (path / "config.json").is_file() and args.quantize else None)
    if args.quantize:
        from llmlab.quantize import check_method

        check_method(args.quantize)
    if kind is None:
        raise ConfigError(f"{path}: neither a run directory (config_resolved.yaml) nor an adapter "
                          f"(adapter_config.json){'' if args.quantize else ' (an HF model directory only with quantize=int8)'}")
    if kind == "model" and args.out is None:
        raise ConfigError(f"{path} is an HF model directory: give --out DIR for quantized-{args.quantize}/")
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
                        help="also write <out>/quantized-int8 for CPU deployment (same as quantize=int8)")
    argv = sys.argv[1:] if argv is None else list(argv)
    # Hydra-style `quantize=int8`, as the other entry points take settings
    argv = [a for item in argv for a in (["--quantize", item.split("=", 1)[1]] if item.startswith("quantize=") else [item])]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        kind = check_args(args)
        import torch

        dtype = getattr(torch, args.dtype) if args.dtype else None
        path = args.path
        if kind == "model":
            return _quantize(path, None, args.out / f"quantized-{args.quantize}", args.quantize)
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
        return _quantize(Path(result["merged"]), tokenizer, out / f"quantized-{args.quantize}", args.quantize)
    return 0


def _quantize(model_dir: Path, tokenizer, out: Path, method: str) -> int:
    """Quantize the exported model in `model_dir` into `out`; print where, the load call and the sizes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab.quantize import human, quantize_int8, save_quantized

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


if __name__ == "__main__":
    sys.exit(main())

"""Memory estimate of one training step per device, for `dry_run=true` (printed and in summary.json).

A first-order model, good for choosing settings (how much a method or precision saves), not a
promise to the megabyte:

- weights: every parameter at the size it will have during training: bf16/16-true precision casts
  floating weights to 2 bytes; 4-bit (QLoRA) weights count their packed storage plus quantization
  constants (about 0.5 + 1/64 bytes/param with double quantization, 0.5 + 4/64 without);
- gradients: trainable parameters only, at their training dtype;
- optimizer states: Adam/AdamW keep 2 tensors per trainable parameter in its dtype, SGD 1 (0 without
  momentum);
- activations: the tensors kept for backward, per layer s*b*h*34 bytes at 16-bit (Korthikanti et al.
  2022, "Reducing Activation Recomputation", without the s^2 attention term since the SDPA kernels do
  not store attention probabilities), twice that in fp32; with gradient checkpointing only each
  layer's input (2*s*b*h bytes at 16-bit) plus one layer recomputed; plus the logits (fp32 for the
  loss: 3 copies of b*s*V*4 bytes: logits, softmax, its gradient; with `loss_chunk_tokens` N, of N*V*4).
  PEFT does not shrink activations much: backprop still runs through every layer to reach the adapters.

ZeRO divides per device: stage 1 the optimizer states, stage 2 also gradients, stage 3 also weights.

Stated error, from one step of the OPT-1.3B architecture against its measured peak RSS less the ~0.39 GB of
imported libraries (bench/RESULTS.md peft_memory): full fine-tuning bf16 3% high; LoRA bf16 6-11% low,
LoRA fp32 15% low, QLoRA 26% low (de-quantized weights, autocast copies and allocator slack that a
first-order count leaves out). Read it as -25% / +5% of the real peak.
"""
from __future__ import annotations

import ctypes
import gc
import json
from pathlib import Path

from omegaconf import OmegaConf

from llmlab.distributed.detect import zero_stage
from llmlab.distributed.precision import half_dtype, weights_dtype

GIB = 1024 ** 3

# glibc mallopt parameters (malloc.h) and the size from which `release_freed_memory` maps blocks
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
RELEASE_FROM_BYTES = 128 * 1024


def glibc():
    """The C library as a ctypes handle when it is glibc (has `mallopt`), else None (musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def release_freed_memory() -> None:
    """`release_freed_memory=true`: blocks >= 128 KiB are mmap'ed, so freeing one unmaps it at once, and the
    heap's free top is trimmed above 128 KiB. glibc's default raises the mmap threshold to the largest block
    freed (up to 32 MB) and keeps freed heap blocks for reuse: a CPU training step's peak RSS then holds the
    de-quantized weights and activations of earlier layers it no longer uses (bench/RESULTS.md peft_memory)."""
    libc = glibc()
    if libc is None or not (libc.mallopt(M_MMAP_THRESHOLD, RELEASE_FROM_BYTES)
                            and libc.mallopt(M_TRIM_THRESHOLD, RELEASE_FROM_BYTES)):
        raise RuntimeError("release_freed_memory=true: glibc's mallopt is not available or refused the setting; "
                           "set release_freed_memory=false")
_ACT_FACTOR_16BIT = 34  # bytes per (token x hidden) per layer at 16-bit activations


def _dim(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def hidden_size(config) -> int | None:
    """An HF config's hidden size under its architecture's name (`hidden_size`, GPT-2's `n_embd`, `d_model`);
    given a model, its config's (None for a module without one)."""
    return _dim(getattr(config, "config", config), "hidden_size", "n_embd", "d_model")


def _four_bit_bytes(numel: int, blocksize: int = 64, nested: bool = True) -> float:
    """Packed NF4 values plus absmax constants (1 byte per block with double quantization, else 4)."""
    return numel * 0.5 + numel / blocksize * (1 if nested else 4)


def _frozen_linear_weights(model) -> set[int]:
    """ids of the frozen Linear/Conv1D weights bitsandbytes would quantize (all but the output head)."""
    out_head = model.get_output_embeddings()
    ids = set()
    for module in model.modules():
        if type(module).__name__ in ("Linear", "Conv1D") and module is not out_head:
            w = getattr(module, "weight", None)
            if w is not None and not w.requires_grad:
                ids.add(id(w))
    return ids


def _weight_bytes(param, train_dtype_bytes: int | None) -> float:
    if type(param).__name__ == "Params4bit":
        qs = getattr(param, "quant_state", None)
        numel = param.numel() * param.element_size() * 2  # two 4-bit values per byte of storage
        return _four_bit_bytes(numel, getattr(qs, "blocksize", 64) or 64, bool(getattr(qs, "nested", False)))
    if param.is_floating_point() and train_dtype_bytes is not None:
        return param.numel() * train_dtype_bytes
    return param.numel() * param.element_size()


def weights_bytes(model, cast_bytes: int | None = None, four_bit: bool = False) -> float:
    """Bytes of the model's parameters; `cast_bytes`: floating weights at that size (bf16-true: 2);
    `four_bit`: frozen linear weights counted as NF4 although `model` is not quantized (a QLoRA dry run
    builds the architecture on the meta device), so a dry run states what the real run will hold."""
    as_four_bit = _frozen_linear_weights(model) if four_bit else set()
    weights = 0.0
    for p in model.parameters():
        if id(p) in as_four_bit:
            weights += _four_bit_bytes(p.numel())
        elif four_bit and not p.requires_grad and p.dim() >= 2 and p.is_floating_point():
            weights += p.numel() * 2  # frozen embeddings in the bf16 compute dtype (peft.upcast=norms)
        else:
            weights += _weight_bytes(p, cast_bytes)
    return weights


def optimizer_states_per_param(optimizer_target: str | None, optimizer_kwargs: dict | None = None) -> int:
    name = (optimizer_target or "").rsplit(".", 1)[-1].lower()
    if name.startswith("sgd"):
        return 1 if (optimizer_kwargs or {}).get("momentum", 0) else 0
    if name in ("adagrad", "rmsprop"):
        return 1
    return 2  # Adam, AdamW and most others


def estimate(model, *, precision: str, batch_size: int, seq_len: int, optimizer_target: str | None = None,
             optimizer_kwargs: dict | None = None, gradient_checkpointing: bool = False, zero: int = 0,
             world_size: int = 1, four_bit: bool = False, loss_chunk_tokens: int | None = None) -> dict:
    """Bytes per device of weights, gradients, optimizer states and activations (+ GiB summary).

    `four_bit`: count frozen linear weights as NF4 even though `model` is not quantized (a QLoRA dry
    run builds the architecture on the meta device). `loss_chunk_tokens`: the loss's logits are held for
    that many tokens at a time (stage.module.loss_chunk_tokens), not for the whole batch.
    """
    precision = str(precision)
    true_half = weights_dtype(precision) in ("bfloat16", "float16")
    cast_bytes = 2 if true_half else None  # mixed/32: weights stay as built (fp32 unless model.dtype)
    weights = weights_bytes(model, cast_bytes, four_bit)
    grads = 0.0
    trainable = 0
    for p in model.parameters():
        if p.requires_grad:
            size = cast_bytes or p.element_size()
            grads += p.numel() * size
            trainable += p.numel()
    optim = 0.0
    n_states = optimizer_states_per_param(optimizer_target, optimizer_kwargs)
    for p in model.parameters():
        if p.requires_grad:
            optim += p.numel() * (cast_bytes or p.element_size()) * n_states

    config = model.config
    hidden = hidden_size(config) or 0
    layers = _dim(config, "num_hidden_layers", "n_layer", "num_layers", default=0)
    vocab = _dim(config, "vocab_size", default=0)
    act_bytes = 2 if half_dtype(precision) else 4
    tokens = batch_size * seq_len
    per_layer = tokens * hidden * _ACT_FACTOR_16BIT * act_bytes / 2
    if gradient_checkpointing:
        activations = layers * tokens * hidden * act_bytes + per_layer
    else:
        activations = layers * per_layer
    activations += 3 * min(tokens, loss_chunk_tokens or tokens) * vocab * 4  # fp32 logits, softmax, gradient

    world = max(1, world_size)
    if zero >= 1:
        optim /= world
    if zero >= 2:
        grads /= world
    if zero >= 3:
        weights /= world
    total = weights + grads + optim + activations
    out = {"weights": weights, "gradients": grads, "optimizer_states": optim, "activations": activations,
           "total": total}
    result = {f"{k}_gib": round(v / GIB, 3) for k, v in out.items()}
    result.update(per_device=True, precision=precision, batch_size=batch_size, seq_len=seq_len,
                  zero_stage=zero, world_size=world, gradient_checkpointing=gradient_checkpointing,
                  optimizer_states_per_param=n_states, trainable_params=trainable, loss_chunk_tokens=loss_chunk_tokens)
    return result


def estimate_for_run(cfg, module) -> dict:
    """`estimate` with the settings of a composed run config and its built stage module."""
    devices = cfg.trainer.get("devices", 1)
    world = (devices if isinstance(devices, int) and devices > 0 else 1) * int(cfg.trainer.get("num_nodes", 1) or 1)
    opt = cfg.stage.module.get("optimizer") or {}
    opt_kwargs = {k: v for k, v in OmegaConf.to_container(opt, resolve=True).items() if not k.startswith("_")} \
        if opt else {}
    qlora = cfg.peft.method == "qlora"
    checkpointing = bool(cfg.stage.module.get("gradient_checkpointing", False)) or (
        qlora and bool(cfg.peft.get("gradient_checkpointing", False)))
    quantized = any(type(p).__name__ == "Params4bit" for p in module.model.parameters())
    chunk = cfg.stage.module.get("loss_chunk_tokens")
    return estimate(module.model, precision=str(cfg.trainer.precision), batch_size=int(cfg.data.batch_size),
                    seq_len=int(cfg.data.block_size), optimizer_target=opt.get("_target_") if opt else None,
                    optimizer_kwargs=opt_kwargs, gradient_checkpointing=checkpointing,
                    zero=zero_stage(cfg.strategy) or 0, world_size=world, four_bit=qlora and not quantized,
                    loss_chunk_tokens=int(chunk) if chunk else None)


def format_estimate(est: dict) -> str:
    return ("memory per device (estimate): weights {weights_gib} GiB + gradients {gradients_gib} GiB + "
            "optimizer {optimizer_states_gib} GiB + activations {activations_gib} GiB = {total_gib} GiB "
            "(precision {precision}, batch {batch_size} x seq {seq_len}, ZeRO-{zero_stage} over {world_size})"
            ).format(**est)


# --------------------------------------------------------------------------------------------------
# Measured memory of this process (Linux /proc), for benchmarks that need a step's own peak
# --------------------------------------------------------------------------------------------------


def status_mb(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MB (VmRSS, VmHWM, RssAnon, RssFile); NaN if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM; `echo 5 > /proc/self/clear_refs`, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def release_and_reset_peak() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), then restart the peak counter, so the
    next peak is that of what follows (e.g. a training step, not model loading)."""
    gc.collect()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
    reset_peak()


def dry_run_report(cfg, module, info: dict, run_dir: Path) -> None:
    """`dry_run=true`: parameter counts and a memory estimate per device (llmlab/distributed/memory.py), no training."""
    memory = estimate_for_run(cfg, module)
    print(format_estimate(memory))
    summary = {**info, "status": "dry_run", "memory": memory, "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return None

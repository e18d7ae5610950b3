"""INT8 quantized export for CPU deployment (`python -m llmlab.export RUN quantize=int8`).

What is quantized: every `nn.Linear` of the model (GPT-2's transformers `Conv1D` layers are first turned
into `nn.Linear`, weight transposed (in, out) -> (out, in)), the LM head included. Weights are int8,
symmetric, one scale per output channel; activations are quantized per batch at run time (dynamic
quantization, as the course's Neural Compressor recipe does) and the matmuls run in PyTorch's FBGEMM
int8 kernels (`torch.ao.nn.quantized.dynamic.Linear`). Embeddings, norms and biases stay fp32.

Tied LM head: untied deliberately. The input embedding keeps its fp32 weights (a lookup, no matmul);
the LM head gets its own int8 copy of the same matrix, since for a ~100M model it is a third of the
decode matmul work (OPT-125M: 50272 x 768 of ~124M weights). The saved config says
tie_word_embeddings=false so nothing re-ties them on load.

Why this library: measured on this CPU (bench/cpu_deploy.py, bench/RESULTS.md) it is the only int8
path that speeds up generation (2x+ greedy); torchao 0.18 (the maintained successor) runs int8
dynamic / weight-only 1-2x *slower* than fp32 in eager decode here, has no CPU int4 kernel
(its int4 layouts need CUDA or the `mslk` package, the fallback stores int4 unpacked as int8 and
runs ~10x slower) and optimum-intel does not install against transformers 5. PyTorch marks
`torch.ao.quantization` deprecated; this file uses only its quantized Linear module and quantized
tensor constructors, which are what `quantize_dynamic` builds.

On disk (`<out>/`): config.json (the fp32 model's, tie_word_embeddings=false), tokenizer files,
`model.safetensors` (plain tensors: fp32 for unquantized ones; for a quantized layer `<name>.qweight`
int8 (out, in), `<name>.qscale` float64 (out,), `<name>.bias`) and `quantization.json` (method,
layers, sizes, the load call). Loads back with ONE call:

    from llmlab.models.quantize import load_quantized

(`python -m llmlab.generate DIR` and `python -m llmlab.eval DIR` do this when they find quantization.json).

Standard loaders (issue 24, point 3), measured 2026-12-07 (bench/gguf_deploy.py, bench/RESULTS.md, Llama
12 x 768, 125M, one thread, 64 and 128 new tokens greedy, CPU seconds per token vs fp32): torchao 0.18 through
`transformers.TorchAoConfig` does write a checkpoint that plain `AutoModelForCausalLM.from_pretrained(dir)`
loads as is (safetensors or not; tests/test_quantize.py checks it), but it decodes *slower* than fp32 here:
Int8WeightOnlyConfig 0.82-0.94x, Int8DynamicActivationInt8WeightConfig 0.49-0.50x, against 2.0-2.5x for this
format; on disk 260 MiB vs this format's 190 MiB (fp32 476 MiB). Its numbers are closer to fp32 (teacher-forced top-1
agreement with fp32 on the tiny trained Llama: weight-only 0.991, dynamic 0.985, this format 0.931; held-out
loss equal to 0.002 for all three). A deployment format that is slower than the model it replaces defeats
the purpose, so `quantize=int8` keeps this format; the export a standard loader reads *and* that is fast on
a CPU is GGUF (`format=gguf quantize=q8_0`: llama.cpp, Ollama, LM Studio; 6x fp32 per CPU second, 127 MiB).

Deprecation plan (this format rests on `torch.ao.quantization`'s dynamic quantized Linear and quantized
tensor constructors, deprecated in torch 2.13):
1. Now: `quantize=int8` writes this format; GGUF q8_0/q4_k_m is the recommended CPU deployment (README).
2. Re-measure with each torchao release (`python bench/gguf_deploy.py --variants
   fp32,int8,ao_int8wo,ao_int8dyn --threads 1`). When a TorchAoConfig int8 decodes faster than fp32 in eager
   mode on x86, or when torch drops `torch.ao.nn.quantized.dynamic.Linear`, whichever comes first,
   `quantize=int8` becomes `from_pretrained(..., quantization_config=TorchAoConfig(<that config>))` +
   `save_pretrained` (an HF directory: `llmlab.models.load` already reads it as one).
3. From then on `load_quantized` (and `is_quantized_dir` in load.py) stays for one more release so older
   exports still load in generate/eval, printing how to re-export; then it is removed with this file's
   FBGEMM code. If torch has removed the kernels before that, old exports must be re-exported from their
   run (`python -m llmlab.export RUN quantize=int8`): the fp32 hf/ beside them is kept for that reason.
"""
from __future__ import annotations

import json
from pathlib import Path

from llmlab.checkpointing.atomic import atomic_dir
from llmlab.errors import ConfigError

# torch, transformers and safetensors are imported inside the functions that use them ("lazy" below):
# llmlab.export checks its arguments (check_method) and llmlab.generate looks for an int8 export
# (is_quantized_dir) before torch loads.

METHODS = ("int8",)
MARKER = "quantization.json"
LOAD_CALL = "from llmlab.models.quantize import load_quantized; model = load_quantized({dir!r})"
# int4 on CPU (torchao 0.18 Int4WeightOnlyConfig / IntxWeightOnlyConfig) was tried and measured, see the
# module docstring: not offered.
WHY_NOT = {"int4": "torchao 0.18 has no int4 CPU kernel here (needs CUDA or the mslk package; its fallback "
                   "stores int4 as int8 and is ~10x slower than fp32); use quantize=int8"}


def check_method(method: str) -> str:
    if method in METHODS:
        return method
    why = WHY_NOT.get(method, f"known: {', '.join(METHODS)}")
    raise ConfigError(f"quantize={method}: not available on CPU: {why}")


def _engine() -> str:
    """The int8 kernel backend; FBGEMM-based ('x86' or 'fbgemm') only: qnnpack (ARM) is not tested here."""
    # lazy: see the note under the imports
    import torch

    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm"):
        if engine in engines:
            torch.backends.quantized.engine = engine
            return engine
    raise ConfigError(f"quantize=int8: this PyTorch build has no x86/FBGEMM int8 kernels (engines: {engines}); "
                      f"run the export on an x86 CPU machine")


def conv1d_to_linear(model) -> list[str]:
    """Replace transformers' Conv1D (GPT-2: y = x @ W + b, W (in, out)) by nn.Linear (W.t(): (out, in))
    in place; returns the replaced module names. Same outputs, now visible to Linear quantizers."""
    # lazy: see the note under the imports
    import torch
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        n_in, n_out = conv.weight.shape
        linear = torch.nn.Linear(n_in, n_out, bias=conv.bias is not None, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        _set_module(model, name, linear)
    return names


def _set_module(model, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _untie_head(model) -> bool:
    """Give the LM head its own weight when it shares the input embedding's; True when it did."""
    # lazy: see the note under the imports
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


def _qlinear(weight_int8, scale, bias):
    """An FBGEMM dynamic int8 Linear from int8 weights (out, in) and per-output-channel scales (out,)."""
    # lazy: see the note under the imports
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    n_out, n_in = weight_int8.shape
    q = torch._make_per_channel_quantized_tensor(weight_int8, scale.double(), torch.zeros(n_out, dtype=torch.long), 0)
    module = DynLinear(n_in, n_out, bias_=bias is not None, dtype=torch.qint8)
    module.set_weight_bias(q, None if bias is None else bias.float())
    return module


def _int8_weight(weight):
    """Symmetric per-output-channel int8: (out, in) fp -> int8 (out, in), scale (out,) float64."""
    # lazy: see the note under the imports
    import torch

    w = weight.detach().double()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantizable_linears(model) -> list[str]:
    """The names of the plain nn.Linear layers (subclasses, e.g. bitsandbytes' 4/8-bit ones, excluded)."""
    # lazy: see the note under the imports
    import torch

    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]


def check_model(model) -> None:
    """ConfigError for a model this quantizer cannot handle, before any work is done."""
    # lazy: see the note under the imports
    import torch

    if getattr(model, "peft_config", None) is not None:
        raise ConfigError("quantize=int8: the model is a PEFT model without a merged form (prefix/prompt "
                          "tuning: virtual tokens); quantize a LoRA/full run's merged model instead")
    if getattr(model.config, "quantization_config", None) is not None or getattr(model, "is_quantized", False):
        raise ConfigError("quantize=int8: the model is already quantized (quantization_config in its config); "
                          "export its de-quantized merged model first (python -m llmlab.export RUN)")
    odd = sorted({type(m).__name__ for m in model.modules()
                  if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear})
    if odd:
        raise ConfigError(f"quantize=int8: the model has Linear subclasses this quantizer cannot handle ({', '.join(odd)}); "
                          f"export a plain merged model first (python -m llmlab.export RUN)")
    from transformers.pytorch_utils import Conv1D

    if not quantizable_linears(model) and not any(isinstance(m, Conv1D) for m in model.modules()):
        raise ConfigError(f"quantize=int8: {type(model).__name__} has no nn.Linear (or GPT-2 Conv1D) layers to "
                          f"quantize; this export supports transformer LMs built from Linear layers")


def quantize_int8(model):
    """The model with every Linear as an int8 dynamic Linear (fp32 elsewhere), in place. Returns
    (model, info) with the quantized layer names, the Conv1D layers converted and whether the head was untied."""
    # lazy: see the note under the imports
    import torch

    check_model(model)
    engine = _engine()
    model = model.float().eval()
    converted = conv1d_to_linear(model)
    untied = _untie_head(model)
    names = quantizable_linears(model)
    with torch.no_grad():
        for name in names:
            lin = model.get_submodule(name)
            q, scale = _int8_weight(lin.weight)
            _set_module(model, name, _qlinear(q, scale, None if lin.bias is None else lin.bias.detach()))
    info = {"method": "int8", "scheme": "dynamic activations, int8 symmetric per-output-channel weights",
            "kernels": f"torch.ao.nn.quantized.dynamic.Linear ({engine})", "quantized": names,
            "conv1d_to_linear": converted, "lm_head_untied": untied, "torch": torch.__version__}
    return model, info


def _quantized_state(model, names: list[str]) -> dict:
    """Plain tensors for safetensors: quantized layers as qweight/qscale/bias, the rest as is (fp32)."""
    state = {}
    quantized = set(names)
    for name in names:
        weight, bias = model.get_submodule(name)._weight_bias()
        state[f"{name}.qweight"] = weight.int_repr().contiguous()
        state[f"{name}.qscale"] = weight.q_per_channel_scales().contiguous()
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().contiguous()
    for key, tensor in model.state_dict().items():
        owner = key.rsplit(".", 2)[0] if "._packed_params." in key else key.rpartition(".")[0]
        if owner in quantized or "_packed_params" in key:
            continue
        state[key] = tensor.detach().contiguous()
    return state


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_quantized(model, info: dict, tokenizer, out: Path, reference: dict | None = None) -> dict:
    """Write the quantized model to `out` (atomically); returns the summary written to quantization.json.
    `reference`: {"fp32"/"bf16"/...: bytes} sizes of unquantized exports to compare against."""
    # lazy: see the note under the imports
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_dir(out) as tmp:
        model.config.save_pretrained(str(tmp))
        save_file(_quantized_state(model, info["quantized"]), str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt", "llmlab_quantization": "int8"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        summary = {**info, "load": LOAD_CALL.format(dir=str(out)),
                   "size_bytes": dir_size(Path(tmp) / "model.safetensors"), "reference_size_bytes": reference or {}}
        (Path(tmp) / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
        (Path(tmp) / "README.md").write_text(
            f"# int8 quantized export (llmlab)\n\n{info['scheme']}; kernels: {info['kernels']}; fp32 embeddings, "
            f"norms and biases; LM head untied: {info['lm_head_untied']}.\n\nLoad (one call):\n\n"
            f"    {summary['load']}\n\nGenerate: `python -m llmlab.generate {out} prompt=...`\n")
    return summary


def is_quantized_dir(path) -> bool:
    return (Path(path) / MARKER).is_file()


def load_quantized(path):
    """The int8 model saved by save_quantized (eval mode, CPU). The one documented load call."""
    # lazy: see the note under the imports
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    info = json.loads((path / MARKER).read_text())
    if info.get("method") != "int8":
        raise ConfigError(f"{path}/{MARKER}: method {info.get('method')!r} is not one this llmlab loads (int8)")
    _engine()
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    conv1d_to_linear(model)
    if info.get("lm_head_untied"):  # the saved config already says untied; this is for older configs
        _untie_head(model)
    state = load_file(str(path / "model.safetensors"))
    layers = {name: (state.pop(f"{name}.qweight"), state.pop(f"{name}.qscale"), state.pop(f"{name}.bias", None))
              for name in info["quantized"]}
    # the fp32 tensors first (quantized modules cannot take a partial state dict), then the int8 layers
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in layers]
    if missing or unexpected:
        raise ConfigError(f"{path}: model.safetensors does not match its config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); re-export it with python -m llmlab.export")
    for name, (weight, scale, bias) in layers.items():
        _set_module(model, name, _qlinear(weight, scale, bias))
    return model.eval()


def human(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


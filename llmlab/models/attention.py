"""Attention implementations (`model.attn_implementation`) and how a packed batch's document boundaries reach them.

A packed row holds several documents; each must attend only to itself (same logits as alone). Transformers' attention
functions take the boundaries in different forms, so `packed_attention_kwargs` gives each the cheapest one it takes:

| implementation | document boundaries as | memory for the mask |
|---|---|---|
| `flash_attention_2` / `_3` (CUDA) | cumulative lengths (`cu_seq_lens_q/k`, FlashAttention's varlen path), no mask | O(B x T) |
| `flex_attention` | a `BlockMask` built from the segment ids (only blocks that hold allowed pairs are computed) | O(B x (T/128)^2) |
| `sdpa` on CUDA | a boolean (B, 1, T, T) mask (True: attend) | B x T^2 bytes |
| `sdpa` on CPU (the default), rows >= 1,024 tokens | per-document SDPA calls (`DOCUMENT_SDPA`), FlashAttention's cumulative lengths | O(B x T) |
| `eager` | an additive float (B, 1, T, T) mask | B x T^2 x 4 bytes (fp32) |

Why per-document on CPU (bench/RESULTS.md "Packed attention"): torch's CPU SDPA with a (B, 1, T, T) mask computes every
(query, key) pair of the row and then masks them, while one causal SDPA call per document computes only the pairs inside
documents; flex attention's backward does not run on CPU in torch 2.13 (`NotImplementedError: FlexAttention does not
support backward on CPU`). `DOCUMENT_SDPA` is registered with transformers as an attention implementation of its own
name (`register_document_sdpa`); without the cumulative lengths (generation, unpacked batches, rows shorter than
`DOCUMENT_MIN_TOKENS`, which keep the boolean mask) it is transformers' `sdpa` unchanged.
"""
from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from llmlab.checks.model import ATTN_IMPLEMENTATIONS
from llmlab.data.packing import block_causal_mask

CUDA_ONLY = ("flash_attention_2", "flash_attention_3")
DOCUMENT_SDPA = "llmlab_document_sdpa"
# rows shorter than this keep the boolean mask under DOCUMENT_SDPA: at 8 x 256 tokens (the tiny default runs) the
# per-document calls measured no faster (0.88 vs 0.81 s a step) and the mask is 0.5 MiB; at 2,048 they were 2-3x
# faster (bench/RESULTS.md "Packed attention"). Short rows also stay bit-identical to the runs before this path.
DOCUMENT_MIN_TOKENS = 1024


def document_lengths(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids (B, T) -> cumulative lengths (N + 1,) int32 of the N runs of equal segment id in the rows laid end
    to end (a row's end always ends a run), FlashAttention's `cu_seqlens` over the (B x T) flattened tokens.

    Padding (segment id -1) is a run of its own, so real tokens never see it wherever it sits; padding's own outputs
    are never scored."""
    B, T = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)  # (B, T): True where a run starts
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    idx = starts.reshape(-1).nonzero().reshape(-1)  # (N,) flat start positions
    total = torch.tensor([B * T], device=segment_ids.device)
    return torch.cat([idx, total]).to(torch.int32)


def varlen_kwargs(segment_ids: torch.Tensor) -> dict:
    """The keyword arguments transformers' FlashAttention path reads for packed rows (`_flash_attention_forward`:
    `cu_seq_lens_q/k`, `max_length_q/k`); `DOCUMENT_SDPA` reads the same."""
    cu = document_lengths(segment_ids)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def document_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """One causal SDPA call per document: query (B, Hq, T, D), key/value (B, Hkv, T, D) -> (B, T, Hq, D), None.

    With `cu_seq_lens_q` (llmlab's packed forward) each run of the flattened (B x T) tokens attends causally to
    itself only; otherwise (generation, padded batches) this is transformers' `sdpa_attention_forward`."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    B, Hq, T, _ = query.shape
    groups = Hq // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # (B, H, T, D) -> (1, H, B*T, D): the rows end to end, as FlashAttention's varlen layout
    q, k, v = (x.transpose(0, 1).reshape(1, Hq, B * T, -1) for x in (query, key, value))
    p = dropout if module.training else 0.0
    outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], dropout_p=p, is_causal=True,
                                           scale=scaling) for s, e in pairwise(cu.tolist())]
    out = torch.cat(outs, dim=2)  # (1, H, B*T, Dv)
    return out.reshape(Hq, B, T, -1).permute(1, 2, 0, 3).contiguous(), None  # (B, T, H, Dv)


def document_sdpa_mask(*args, **kwargs):
    """The mask `DOCUMENT_SDPA` is given: none for a packed training forward (no padding mask, as many keys as
    queries, no cache: the cumulative lengths say everything), else the one transformers' sdpa would get."""
    if kwargs.get("attention_mask") is None and kwargs.get("kv_length") == kwargs.get("q_length") \
            and not kwargs.get("kv_offset") and not kwargs.get("q_offset"):
        return None
    return sdpa_mask(*args, **kwargs)


def register_document_sdpa() -> None:
    """Make `DOCUMENT_SDPA` a name transformers' models dispatch on (idempotent). Called where a model is switched
    to it, not at import: transformers.modeling_utils imports torchao, which warns as it loads, and this module is
    imported by train.py before `console.quiet_libraries()` runs."""
    from transformers.modeling_utils import AttentionInterface  # lazy: an order that matters (see above)

    AttentionInterface.register(DOCUMENT_SDPA, document_sdpa_forward)
    AttentionMaskInterface.register(DOCUMENT_SDPA, document_sdpa_mask)


def flex_block_mask(segment_ids: torch.Tensor):
    """segment_ids (B, T) -> a flex attention `BlockMask` (B, 1, T, T): causal within a document, nothing across
    (padding, id -1, sees only padding before it). Only its 128 x 128 blocks that hold an allowed pair are computed;
    the mask itself is O(B x (T/128)^2) block indices."""
    from torch.nn.attention.flex_attention import create_block_mask  # lazy: only flex_attention runs need it

    def document_causal(b, h, q, kv):
        return (segment_ids[b, q] == segment_ids[b, kv]) & (q >= kv)

    B, T = segment_ids.shape
    return create_block_mask(document_causal, B, None, T, T, device=segment_ids.device)


def attn_implementation(model) -> str | None:
    """The attention implementation a (possibly PEFT-wrapped) transformers model runs: `config._attn_implementation`."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def is_compiled(model) -> bool:
    """`models.build.compile_forward` ran on it (`nn.Module.compile()` sets `_compiled_call_impl`)."""
    return getattr(model, "_compiled_call_impl", None) is not None


def packed_attention_kwargs(model, segment_ids: torch.Tensor, position_ids: torch.Tensor, mask_dtype) -> dict:
    """Keyword arguments for `model(...)` that keep each document of packed rows to itself (see the table above).

    `model` is the transformers model (inside PEFT's wrappers); segment_ids, position_ids (B, T); `mask_dtype()`
    gives the dtype of a dense mask where one is needed (bool for sdpa, the compute dtype for eager). On the CPU a
    model on `sdpa` is switched to `DOCUMENT_SDPA` for good (it is sdpa wherever no cumulative lengths are passed, and
    gradient checkpointing re-runs attention in backward, so the choice must not change between the two); not under
    `compile=true` (the per-document loop has a data-dependent length: one graph per batch's document count). Rows
    shorter than `DOCUMENT_MIN_TOKENS` keep the boolean mask (DOCUMENT_SDPA with a mask is sdpa)."""
    impl = attn_implementation(model)
    if impl == "sdpa" and segment_ids.device.type == "cpu" and not is_compiled(model):
        register_document_sdpa()
        model.config._attn_implementation = impl = DOCUMENT_SDPA
    if impl in CUDA_ONLY or (impl == DOCUMENT_SDPA and segment_ids.shape[1] >= DOCUMENT_MIN_TOKENS):
        return {"position_ids": position_ids, **varlen_kwargs(segment_ids)}
    if impl == "flex_attention":
        return {"attention_mask": flex_block_mask(segment_ids), "position_ids": position_ids}
    # sdpa (and DOCUMENT_SDPA, which is sdpa with a mask) takes a boolean mask whatever its queries' dtype
    dtype = torch.bool if impl in ("sdpa", DOCUMENT_SDPA) else mask_dtype()
    return {"attention_mask": block_causal_mask(segment_ids, dtype), "position_ids": position_ids}

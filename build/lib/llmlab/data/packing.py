"""Packing tokenized documents into fixed-length blocks, with no padding.

Boundary behaviour (tested in tests/test_packing.py):
- every document is followed by EOS, which is a normal target (the model learns where text ends);
- documents are concatenated and cut into blocks of exactly `block_size` tokens; a long document
  continues in the next block; the final partial block is dropped (at most block_size-1 tokens);
- each token carries a `segment_id` (which document it belongs to within its block) and a
  `position_id` that restarts at 0 where a document starts. With `packing: document` (the default)
  the stage turns segment ids into a block-diagonal causal mask, so a document never attends to
  another one and its logits equal those it would get alone. With `packing: concat`, attention and
  positions run across documents (classic GPT-2 / nanoGPT pretraining).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


def pack(token_lists: Iterable[list[int]], block_size: int, eos_id: int) -> Iterator[dict]:
    """Yield {"input_ids", "segment_ids", "position_ids"}: each a LongTensor of shape (block_size,)."""
    ids: list[int] = []
    segs: list[int] = []
    pos: list[int] = []
    doc = 0
    for tokens in token_lists:
        tokens = list(tokens) + [eos_id]
        ids.extend(tokens)
        segs.extend([doc] * len(tokens))
        pos.extend(range(len(tokens)))
        doc += 1
        while len(ids) >= block_size:
            block_segs = segs[:block_size]
            first = block_segs[0]
            # a document cut by the previous block restarts its positions in this one
            start = pos[0]
            block_pos = [p - start if s == first else p for p, s in zip(pos[:block_size], block_segs)]
            yield {
                "input_ids": torch.tensor(ids[:block_size]),
                "segment_ids": torch.tensor([s - first for s in block_segs]),
                "position_ids": torch.tensor(block_pos),
            }
            del ids[:block_size], segs[:block_size], pos[:block_size]


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """segment_ids (B, T) -> additive mask (B, 1, T, T): 0 where a token may attend, -inf-like elsewhere
    (`dtype=torch.bool`: True where a token may attend, what SDPA takes for queries of any dtype).

    Causal within a segment, nothing across segments. Padding gets its own segment id (-1) in the
    collators, so real tokens never attend to it.
    """
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = same & causal
    # rows of padding would be fully masked (NaN in softmax): let them see themselves
    allowed |= torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    if dtype == torch.bool:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]

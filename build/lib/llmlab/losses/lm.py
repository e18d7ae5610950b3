"""Token-level language-modelling quantities shared by every stage.

Convention (HF): ``labels`` are aligned with ``input_ids`` (positions to skip are ``IGNORE_INDEX``);
the functions shift internally, so ``logits[:, t]`` scores ``labels[:, t + 1]``. Everything is
computed in fp32 so bf16/fp16 logits do not lose precision in the softmax normaliser.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the last prediction and the first label so position t predicts token t+1."""
    return logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)


def causal_lm_loss_sum(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy and the number of target tokens.

    Returned separately so gradient accumulation can divide by the token count of the whole
    optimizer step, not by a mean of per-micro-batch means (axolotl#2262).
    """
    logits, labels = _shift(logits, labels)  # (B, T-1, V), (B, T-1)
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return loss_sum, (labels != ignore_index).sum()


def _head_cross_entropy_sum(head, hidden: Tensor, targets: Tensor) -> Tensor:
    """sum CE(head(hidden), targets) for one chunk: (n, H), (n,) -> () in fp32."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")  # head(hidden): (n, V)


def chunked_causal_lm_loss_sum(hidden: Tensor, head, labels: Tensor, chunk_tokens: int,
                               ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """`causal_lm_loss_sum` from the final hidden states, never holding the full (B, T, V) logits.

    `head` is the model's output layer (hidden -> vocabulary logits). Only the positions with a target are
    scored (an SFT prompt's positions cost no head matmul), `chunk_tokens` of them at a time; each chunk's
    logits are recomputed in backward (non-reentrant activation checkpointing) instead of being kept, so
    the loss's memory is one chunk's logits (n x V in the compute dtype and fp32, and their gradient)
    rather than the whole batch's. The same sum and gradients as the full path up to fp32 summation
    order (tests/test_chunked_loss.py).
    """
    hidden, labels = hidden[:, :-1], labels[:, 1:]  # (B, T-1, H), (B, T-1): position t predicts t+1
    keep = labels != ignore_index  # (B, T-1)
    hidden, targets = hidden[keep], labels[keep]  # (n, H), (n,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        total = total + checkpoint(_head_cross_entropy_sum, head, h, y, use_reentrant=False)
    return total, keep.sum()


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean next-token cross-entropy over non-ignored targets (0, not NaN, when there are none)."""
    loss_sum, n_tokens = causal_lm_loss_sum(logits, labels, ignore_index)
    return loss_sum / n_tokens.clamp_min(1)


def gather_logprobs(logits: Tensor, index: Tensor) -> Tensor:
    """log softmax(logits)[index] as ``logit[index] - logsumexp(logits)``, never holding a full fp32
    log-softmax copy at once: low-precision logits are upcast one row at a time."""
    # logits (B, T, V), index (B, T) -> (B, T)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (B, T)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_index in zip(logits, index):  # (T, V), (T,)
        row_logits = row_logits.float()
        rows.append(row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token log p(labels[:, 1:]) of shape (B, T-1), unmasked (PPO masks it itself).

    Negative labels (e.g. IGNORE_INDEX) are looked up as token 0; their values are meaningless and
    must be masked by the caller.
    """
    logits, labels = _shift(logits, labels)  # (B, T-1, V), (B, T-1)
    return gather_logprobs(logits, labels.clamp_min(0))  # (B, T-1)


def sequence_logprobs(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, average: bool = False
) -> Tensor:
    """Sum (or mean, if ``average``) of log p(label) over non-ignored targets: one score per sequence,
    as used by DPO/IPO (Rafailov et al. 2023) for log pi(y | x)."""
    mask = labels[:, 1:] != ignore_index  # (B, T-1)
    logps = token_logprobs(logits, labels) * mask  # (B, T-1)
    total = logps.sum(-1)  # (B,)
    return total / mask.sum(-1).clamp_min(1) if average else total


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution at every position, (B, T, V) -> (B, T).

    ``entr`` (-p log p, with 0 log 0 = 0) keeps -inf logits (banned tokens) from producing NaN."""
    return torch.special.entr(F.softmax(logits.float(), dim=-1)).sum(-1)

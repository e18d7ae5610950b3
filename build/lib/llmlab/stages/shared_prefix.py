"""Completion log-probs with the prompt computed once per group (grpo's update and old/reference passes).

A GRPO rollout repeats each prompt G times (`num_generations`), and on the built-in data the prompt is
most of the sequence ("Question: reverse cabd\\n\\nAnswer: " ~35 tokens, answers <= 7). The plain forward
runs every row's prompt again: G x the prompt work. Here the prompt of each group in the micro-batch is run
once, with gradients, its key/value cache is indexed out to the group's rows (`Cache.reorder_cache`: an
index_select, differentiable, so the completions' gradient reaches the prompt positions' weights exactly as
in the full forward), and only the completion tokens run on top of it. Same numbers as the full forward
(tests/test_grpo_shared_prefix.py: log-probs and gradients), ~(P + R) / (P / G + R) fewer tokens.

Generation likewise (`prefill_prompts`): the cache of each distinct prompt is computed once and repeated
G times before `generate` samples the completions.

Not used (the full forward instead) when the model cannot take a cache this way: prompt learning PEFT
(prefix / prompt tuning own past_key_values or prepend virtual tokens) and gradient checkpointing (HF turns
the cache off in training).
"""
from __future__ import annotations

import torch

from llmlab.losses import entropy_from_logits, gather_logprobs
from llmlab.stages.common import position_ids_from_mask


def can_share_prompt(model) -> bool:
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict) and any(getattr(c, "is_prompt_learning", False) for c in config.values()):
        return False
    new_name = hasattr(type(model), "is_activation_checkpointing")  # transformers 5 renamed it
    return not getattr(model, "is_activation_checkpointing" if new_name else "is_gradient_checkpointing", False)


def prefill_prompts(model, prompt_ids, prompt_mask, repeats: int):
    """The key/value cache of all but the last token of each distinct prompt (B, P) -> a cache of B x `repeats`
    rows (each prompt's rows consecutive, as `repeat_interleave`), for `generate(past_key_values=...)`: it then
    feeds only the last prompt token and samples as from scratch (the same distribution; the prompt's prefill
    costs B rows instead of B x repeats)."""
    if prompt_ids.shape[1] < 2:
        return None
    position_ids = position_ids_from_mask(prompt_mask)  # as generate computes them
    cache = model(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1], position_ids=position_ids[:, :-1],
                  use_cache=True, logits_to_keep=1).past_key_values
    if cache is not None:
        cache.batch_repeat_interleave(repeats)
    return cache


def full_logits(model, input_ids, attention_mask, position_ids, P: int, temperature: float):
    """Logits of the R + 1 positions from the prompt's last token (TRL's logits_to_keep) -> (B, R, V)
    logits / temperature that predict the completion tokens input_ids[:, P:]."""
    R = input_ids.shape[1] - P
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, logits_to_keep=R + 1).logits  # (B, R + 1, V)
    return logits[:, :-1] / temperature


def shared_prompt_logits(model, prompt_ids, prompt_mask, completions, attention_mask, position_ids, group,
                         temperature: float):
    """(n, R, V) logits / temperature for the completion tokens, the prompt run once per group.

    prompt_ids, prompt_mask: (n, P) left-padded, equal within a group; completions: (n, R);
    attention_mask, position_ids: (n, P + R) of the whole sequences; group: (n,) group id of each row."""
    P = prompt_ids.shape[1]
    groups, inverse = torch.unique(group, return_inverse=True)  # (g,), (n,): row -> its group's slot
    first = torch.empty_like(groups)
    first[inverse] = torch.arange(len(group), device=group.device)  # a row of each group (their prompts are equal)
    out = model(input_ids=prompt_ids[first], attention_mask=prompt_mask[first], position_ids=position_ids[first, :P],
                use_cache=True, logits_to_keep=1)  # logits (g, 1, V): the first completion token's
    cache = out.past_key_values
    if cache is None:  # the model would not return a cache: run the rows in full
        return full_logits(model, torch.cat([prompt_ids, completions], 1), attention_mask, position_ids, P,
                             temperature)
    cache.reorder_cache(inverse)  # (g, heads, P, d) -> (n, heads, P, d) per layer, differentiable
    rest = model(input_ids=completions, attention_mask=attention_mask, position_ids=position_ids[:, P:],
                 past_key_values=cache, use_cache=True).logits  # (n, R, V): predicts tokens 1..R (R unused)
    return torch.cat([out.logits[inverse], rest[:, :-1]], 1) / temperature  # (n, R, V)


def logprobs_and_entropy(logits, completions, entropy: bool):
    """(n, R, V) logits -> log pi(completions) (n, R), and with `entropy` the per-token entropy (no grad)."""
    logprobs = gather_logprobs(logits, completions)  # (n, R)
    if not entropy:
        return logprobs
    with torch.no_grad():
        return logprobs, entropy_from_logits(logits)


def pair_completions(batch: dict, ignore_index: int = -100):
    """A (2B, T) preference batch (chosen rows, then rejected; prompt positions labelled `ignore_index`) as
    its B prompts and 2B completions, for `shared_prompt_logits` with groups of 2; None when some pair's two
    rows do not start with the same prompt (cut differently to fit block_size) or a prompt is empty.

    -> prompt_ids, prompt_mask (B, P) left-padded (the batch's own), completions (2B, R) right-padded with
    each row's response tokens, completion_mask (2B, R)."""
    ids, labels = batch["input_ids"], batch["labels"]  # (2B, T)
    B = ids.shape[0] // 2
    target = labels != ignore_index  # (2B, T): the response (and EOS) positions, contiguous
    lengths = target.sum(1)  # (2B,)
    starts = target.long().argmax(1)  # (2B,): each row's prompt length
    prompt_ids, prompt_mask = batch.get("prompt_ids"), batch.get("prompt_mask")
    if prompt_ids is None or B == 0 or bool((starts == 0).any()) or not torch.equal(starts[:B], starts[B:]):
        return None
    if not torch.equal(prompt_mask.sum(1), starts[:B]):
        return None
    P = prompt_ids.shape[1]
    for i in range(B):  # the same prompt tokens in both rows (and in prompt_ids)
        p = int(starts[i])
        if not (torch.equal(ids[i, :p], ids[B + i, :p]) and torch.equal(ids[i, :p], prompt_ids[i, P - p:])):
            return None
    R = int(lengths.max())
    offsets = torch.arange(R, device=ids.device)  # (R,)
    completion_mask = offsets < lengths[:, None]  # (2B, R)
    where = (starts[:, None] + offsets).clamp_max(ids.shape[1] - 1)  # (2B, R)
    completions = torch.where(completion_mask, ids.gather(1, where), torch.zeros_like(where))
    return prompt_ids, prompt_mask, completions, completion_mask.long()


def pair_token_logprobs(model, shared) -> torch.Tensor:
    """log pi(completion tokens) (2B, R), zero at padding, with each pair's prompt run once (`pair_completions`'s
    output `shared`)."""
    prompt_ids, prompt_mask, completions, completion_mask = shared
    B = prompt_ids.shape[0]
    prompts, prompts_mask = prompt_ids.repeat(2, 1), prompt_mask.repeat(2, 1)  # (2B, P): chosen rows, rejected
    attention_mask = torch.cat([prompts_mask, completion_mask], 1)  # (2B, P + R)
    group = torch.arange(B, device=prompt_ids.device).repeat(2)  # (2B,): row i and B + i share prompt i
    logits = shared_prompt_logits(model, prompts, prompts_mask, completions, attention_mask,
                                  position_ids_from_mask(attention_mask), group, 1.0)  # (2B, R, V)
    return gather_logprobs(logits, completions) * completion_mask  # (2B, R)

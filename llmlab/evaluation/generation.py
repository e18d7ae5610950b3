"""Generation, in one place: validation's greedy answers, end-of-run samples, `python -m llmlab.generate`,
and what ZeRO-3 needs around any `model.generate` (rollouts of ppo/grpo, lm-eval during training).

Under ZeRO-3 a rank holds shards and every forward all-gathers each layer, so a rank that stops early
(EOS) would leave the others waiting forever. Two cures, chosen here and nowhere else:
- gathered weights, per-layer hooks off (`generation_context`, default): ranks then generate
  independently and fast; needs the whole model in one process's memory;
- `synced_gpus=True` (`needs_synced_gpus`): HF keeps every rank stepping until all are done; memory-light,
  slower. Validation's greedy answers use it (the weights stay partitioned between validation batches).

Prompts and stops are the model's own: a conversation (or any prompt under `template=chat`) is rendered with
the tokenizer's chat template and its generation prompt (`render_prompts`), and generation stops at every id of
`data.chat.stop_ids` (generation_config's EOS, which may be a list, the tokenizer's EOS, the chat template's
end-of-turn token), not only at the tokenizer's EOS: passing `eos_token_id=tokenizer.eos_token_id` to
`generate` overrode a Llama 3 Instruct generation_config's [<|eot_id|>, <|end_of_text|>].

Generation runs eager under `compile: true` (`eager_generation`): every decode step changes the input
length and the KV cache's state, so a compiled forward recompiled on each and, past dynamo's limit of 8
graphs (reached in one tiny PPO run), ran eager anyway; that run took 26 s, 16 s with eager generation.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from llmlab.data.chat import render_prompt, stop_ids
from llmlab.distributed.detect import is_zero3
from llmlab.distributed.zero3 import gathered_without_hooks, world_size
from llmlab.errors import ConfigError
from llmlab.models.moe import router_logits_off


def eager_generation():
    """A context in which a model compiled by `models.compile_forward` runs its eager forward (a no-op
    otherwise): generation's shapes change every step (see the module docstring)."""
    return torch.compiler.set_stance("force_eager")


def needs_synced_gpus(model) -> bool:
    """Whether `model.generate` on partitioned weights needs `synced_gpus=True`: ZeRO-3, several ranks."""
    return is_zero3(model) and world_size() > 1


@contextlib.contextmanager
def generation_context(model, strategy: Any = None, *, gather: bool = True) -> Iterator[dict]:
    """Use around `model.generate(...)` so ZeRO-3 ranks neither hang nor crawl; yields extra generate kwargs.

        with generation_context(self.model, self.trainer.strategy) as gen_kwargs:
            out = self.model.generate(input_ids, max_new_tokens=32, **gen_kwargs)

    `gather=True` (default): the full parameters gathered once and DeepSpeed's per-layer hooks removed
    for the call (`zero3.gathered_without_hooks`); yields `{}`. `gather=False`: yields
    `{"synced_gpus": True}` with several ranks. Not ZeRO-3 (neither the strategy nor the model's
    parameters): a no-op yielding `{}`. Collective under ZeRO-3: all ranks must enter it.
    """
    with eager_generation():  # rollouts (ppo, grpo): eager under `compile: true`
        if not (is_zero3(strategy) or is_zero3(model)):
            yield {}
        elif not gather:
            yield {"synced_gpus": world_size() > 1}
        else:
            with gathered_without_hooks(model, strategy):
                yield {}


def model_stop_ids(model, tokenizer) -> list[int]:
    """The ids generation of `model` stops at (`data.chat.stop_ids` of its generation_config and tokenizer)."""
    return stop_ids(tokenizer, getattr(model, "generation_config", None))


CHAT = "chat"  # the `template` value (generate, eval) that renders plain prompts with the chat template


def render_prompts(tokenizer, prompts: list, template: str | None = None) -> list[str]:
    """Prompt texts as the model sees them. A conversation (a list of {role, content}) -> the chat template with
    its generation prompt; a string -> under template=chat one user message rendered the same way, else
    `template` with {prompt} (None: the string as is)."""
    texts = []
    for p in prompts:
        if isinstance(p, str) and template != CHAT:
            texts.append(template.format(prompt=p) if template else p)
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template=chat and conversational prompts need a tokenizer with a chat template, "
                              "and this model's has none: use template=none or a '{prompt}' template")
        texts.append(render_prompt(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p))
    return texts


@torch.no_grad()
def decode_new(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
               **generate_kwargs) -> list[str]:
    """`model.generate` on left-padded prompts (B, Tp) in eval mode (the mode is restored), pad from the
    tokenizer, stopping at `model_stop_ids`; returns only the new text of each prompt, without special tokens."""
    if generate_kwargs.get("stop_strings"):
        generate_kwargs["tokenizer"] = tokenizer  # HF matches stop strings on decoded tokens
    was_training = model.training
    model.eval()
    with eager_generation():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=model_stop_ids(model, tokenizer),
                             **router_logits_off(model), **generate_kwargs)  # (B, Tp + new)
    model.train(was_training)
    return tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)


def greedy_answers(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                   synced_gpus: bool | None = None) -> list[str]:
    """Greedy continuations of left-padded prompts (B, Tp) (validation's exact match). Under ZeRO-3 with
    several ranks it generates on the partitioned weights with `synced_gpus` (None: decided here)."""
    if synced_gpus is None:
        synced_gpus = needs_synced_gpus(model)
    return decode_new(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, do_sample=False, num_beams=1,
                      synced_gpus=synced_gpus)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text up to the first stop sequence (excluded)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if s and i >= 0:
            cut = min(cut, i)
    return text[:cut]


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, *, batch_size: int | None = None,
                  stop: list[str] | None = None, **generate_kwargs) -> list[str]:
    """New text for each prompt string: left-padded batches of `batch_size` (None: all at once); with
    `stop` sequences generation ends at the first one, which is cut from the text."""
    stop = [s for s in (stop or []) if s]
    if stop:
        generate_kwargs.update(stop_strings=stop)
    size = max(1, int(batch_size)) if batch_size else max(1, len(prompts))
    texts: list[str] = []
    for i in range(0, len(prompts), size):
        enc = tokenizer.pad({"input_ids": [prompt_ids(tokenizer, p) for p in prompts[i:i + size]]}, padding=True,
                            padding_side="left", return_tensors="pt").to(model.device)
        texts += decode_new(model, tokenizer, enc["input_ids"], enc["attention_mask"], max_new_tokens,
                            **generate_kwargs)
    return [cut_at_stop(t, stop) for t in texts]


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A prompt's tokens as training encodes a prompt (data/rows.py): with the tokenizer's own special tokens
    (Llama's, Gemma's BOS: without it a Llama or Gemma model continues text it never saw), except where the
    text already starts with BOS (a chat template wrote it; added again it would be doubled; lm-eval's HFLM
    decides the same way)."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

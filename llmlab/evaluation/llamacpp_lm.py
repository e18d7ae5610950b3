"""lm-eval on a GGUF export, evaluated by llama.cpp in this process (`python -m llmlab.eval DIR|FILE.gguf`).

Why not lm-eval's own `gguf` model type: it is an HTTP client of a running llama.cpp *server*
(lm_eval/models/gguf.py posts to `/v1/completions` and reads `logprobs`), so it needs a server started
beside the evaluation, a port, and the server's top-k logprobs (a continuation token outside the top k has
no log-probability there). llama-cpp-python is already llmlab's GGUF dependency (export checks, generate):
`llama_cpp.Llama` with `logits_all=True` gives the full (T, V) logits of a sequence in process, which is
what the three request types need, with no server to start or stop.

Tokens: llama.cpp's own tokenizer (the vocabulary in the file), as llmlab.generate tokenizes a prompt: no
BOS added, special tokens in the text parsed (the built-in choices end with the EOS text). lm-eval's
`TemplateLM` does the rest as for HFLM (context/continuation split, empty contexts, trailing spaces), so
the same requests reach llama.cpp as reach transformers; scoring follows HFLM's `_loglikelihood_tokens`
(the last `max_length + 1` tokens, logits at the continuation's positions) and rolling windows of
`max_length` tokens (lm-eval's `get_rolling_token_windows`). `max_length` is the file's training context
(`n_ctx_train`) capped at MAX_CTX, the KV cache llama.cpp allocates. Requests are scored one sequence at a
time (`batch_size` does not apply); consecutive requests sharing a context reuse its KV cache (`_logprobs`).

Registered with lm-eval as `llmlab_llamacpp` (`lm_eval --model llmlab_llamacpp --model_args
path=DIR` once llmlab is imported); llmlab.eval hands lm-eval an instance.
"""
from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmlab.models.gguf import load_gguf

MAX_CTX = 4096  # KV cache cap: a 128k-context file would otherwise allocate its whole window


def log_softmax(logits):
    """(T, V) float32 logits -> float64 log-probabilities (numpy)."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@register_model("llmlab_llamacpp")
class LlamaCppLM(TemplateLM):
    def __init__(self, path, threads: int | None = None, max_length: int | None = None, **_):
        super().__init__()
        import llama_cpp

        probe = load_gguf(path, n_ctx=8, threads=threads)  # n_ctx_train is the file's, not the context's
        n_ctx = min(int(max_length or probe._model.n_ctx_train()), MAX_CTX)
        probe.close()
        self.path = Path(path)
        # the same loader as generate (file or gguf-<quant>/ dir, a damaged file as one line), every position's logits
        self.llm = load_gguf(path, n_ctx=n_ctx, threads=threads, logits_all=True, n_batch=min(n_ctx, 512))
        self.max_length = n_ctx
        vocab = self.llm._model.vocab
        self._eos = int(self.llm.token_eos())
        self._is_eog = lambda t: bool(llama_cpp.llama_vocab_is_eog(vocab, t))
        self.eos_token = self.detokenize([self._eos])  # the built-in choices end with this text
        # as harness.prefix_token for a transformers tokenizer: the BOS the vocabulary itself starts sequences
        # with, else EOS
        starts = self.llm.tokenize(b"a", add_bos=True, special=False)
        bos = int(self.llm.token_bos())
        self._prefix = bos if bos >= 0 and starts and starts[0] == bos else self._eos

    # ---- tokens --------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.llm.tokenize(string.encode(), add_bos=bool(add_special_tokens), special=True)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=True).decode("utf-8", errors="replace")

    # ---- scoring -------------------------------------------------------------------------------

    def _logprobs(self, tokens: list[int]):
        """(len(tokens), V) log-probabilities of the next token after each of `tokens`. The KV cache of
        the longest common prefix with the previous call is kept (a multiple-choice question's choices
        share their context), as llama_cpp.Llama.generate does: only the rest is evaluated."""
        keep = 0
        for a, b in zip(self.llm.input_ids[: self.llm.n_tokens], tokens[:-1]):
            if a != b:
                break
            keep += 1
        self.llm.n_tokens = keep  # eval() drops the cache past n_tokens
        self.llm.eval(tokens[keep:])
        return log_softmax(self.llm.scores[: len(tokens)])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = []
        for strings, context_enc, continuation_enc in requests:
            # as HFLM: the last max_length + 1 tokens; the last one is only a target
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            n = len(continuation_enc)
            logp = self._logprobs(whole[:-1])[-n:]  # (n, V): predictions of the continuation's tokens
            targets = whole[-n:]
            out.append((float(sum(logp[i, t] for i, t in enumerate(targets))),
                        all(int(logp[i].argmax()) == t for i, t in enumerate(targets))))
            self.cache_hook.add_partial("loglikelihood", strings, out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [r.args for r in requests]:
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            total = sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows]))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (argmax of llama.cpp's logits) until an end-of-generation token, a stop string or
        max_gen_toks, as HFLM does with do_sample=false; sampling is refused (llmlab's tasks are greedy)."""
        from llmlab.errors import ConfigError
        from llmlab.evaluation.generation import cut_at_stop
        from llmlab.models.gguf import greedy

        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            kwargs = dict(gen_kwargs)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                raise ConfigError(f"gen_kwargs={gen_kwargs}: a GGUF export is evaluated greedily here "
                                  f"(do_sample=false, temperature=0)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            # as HFLM: the context's last tokens, leaving room for the new ones
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1):]
            new = greedy(self.llm, ids, max_new, stop_at_eos=True)
            text = cut_at_stop(self.detokenize(new), [self.eos_token, *until])
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

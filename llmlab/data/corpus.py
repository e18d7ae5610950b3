"""Prepared corpora: pretraining text tokenized once into token files that every rank and every later run reads.

Why not tokenize at each start (what `LMFormat.build` does for the built-in data): a Python list of blocks
costs ~33 bytes of memory per byte of text in every process and ~2.4 s per MB before step 1 (issue 22's
table). nanoGPT, LitGPT (litdata) and most pretraining code bases write token ids to flat files once and read
them by offset; this module does the same.

One prepared corpus is a directory under `data.cache_dir` (default `$LLMLAB_CACHE/corpora`, `~/.cache/llmlab`):

    tokens.bin  every document's tokens followed by EOS, concatenated; uint16 when the vocabulary fits, else uint32
    docs.npy    int64 (n_docs + 1,): where each document starts in tokens.bin; the last entry is the token count
    meta.json   the key (everything that determines the tokens), dtype, counts; written last

Its name is `<first file's stem>-<hash of the key>`: the key covers the files' identity (path, size, mtime), the
tokenizer's fingerprint, the text field, `sample_by`, which records (all, or one side of a seeded random split)
and this format's version. Another key is another directory, so nothing stale is ever read; when a directory for
the same files exists under another key, the log says which part of the key changed. A directory is built under a
temporary name and renamed into place when complete (a kill leaves no trusted half-corpus); on open, sizes and
counts are checked against meta.json and a damaged one is rebuilt. Processes that start together (DDP ranks)
take a file lock: one tokenizes, the others wait and read.

`TokenBlocks` reads block i = tokens[i*T : (i+1)*T] of a token range with one `pread` (no memory map: pages read
by a map count in the process's resident memory, the page cache does not), with the same segment and position ids
as `packing.pack` gives for the same documents (tested: tests/test_corpus.py). Memory does not grow with the
corpus: the doc starts are memory-mapped and searched (two binary searches per block).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch

from llmlab.checkpointing.atomic import fsync_dir, remove
from llmlab.errors import DataError

log = logging.getLogger("llmlab")

VERSION = 1  # of the layout and of how text becomes tokens: bump it and every old corpus is re-tokenized
CHUNK_CHARS = 1 << 20  # a long document is tokenized in pieces of about this many characters (see encode_document)
SHARD_RECORDS = 20_000  # records per unit of work given to a tokenizing process


# --------------------------------------------------------------------------------------------------
# The key
# --------------------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """What determines the ids a tokenizer gives: its serialized model, normalizer and pre-tokenizer (a fast
    tokenizer's JSON) or its vocabulary (a slow one), its class and its EOS id."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]


def file_identity(paths) -> list[list]:
    """[resolved path, size, mtime in ns] per file: a file rewritten in place changes size or mtime."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(data_cfg) -> Path:
    """data.cache_dir, else $LLMLAB_CACHE/corpora (the cache of llmlab.models.bases, ~/.cache/llmlab)."""
    configured = data_cfg.get("cache_dir")
    if configured:
        return Path(str(configured)).expanduser()
    return Path(os.environ.get("LLMLAB_CACHE", Path.home() / ".cache" / "llmlab")) / "corpora"


def writable(root: Path) -> None:
    """Create the cache directory and check that it can be written, or say which setting to change (one line)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise DataError(f"data.cache_dir={root} cannot be written ({type(err).__name__}: {err.strerror or err}); "
                        f"set data.cache_dir (or LLMLAB_CACHE) to a writable directory") from None


def _key_changes(old: dict, new: dict) -> str:
    names = {"files": "the files (path, size or mtime)", "tokenizer": "the tokenizer",
             "text_field": "data.text_field", "sample_by": "data.sample_by", "records": "the records selected "
             "(data.val_fraction / data.seed)", "version": "llmlab's corpus format"}
    changed = [names.get(k, k) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(changed) or "nothing visible"


# --------------------------------------------------------------------------------------------------
# Tokenizing (in worker processes for large corpora)
# --------------------------------------------------------------------------------------------------
def _pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut just after a newline that is followed by a
    non-space character. Byte-level BPE pre-tokenizers (GPT-2, Llama 3, Qwen, ...) never join such a newline
    with the next character, so the pieces' tokens concatenated equal the whole text's (checked per document in
    encode_document)."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        if cut >= len(text):
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_document(tokenizer, text: str, chunk_chars: int = CHUNK_CHARS) -> list[int]:
    """One document's token ids (no special tokens). A document longer than `chunk_chars` (a book as one .txt
    document) is tokenized piece by piece: tokenizing 500 MB at once costs the Rust tokenizer ~40 bytes per
    token. When the first cut changes the tokens (a SentencePiece tokenizer that adds a prefix space per call),
    the whole text is tokenized at once instead."""
    pieces = _pieces(text, chunk_chars) if len(text) > chunk_chars else [text]
    if len(pieces) == 1:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    first = tokenizer(pieces[:2], add_special_tokens=False)["input_ids"]
    if tokenizer(pieces[0] + pieces[1], add_special_tokens=False)["input_ids"] != first[0] + first[1]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = first[0] + first[1]
    for i in range(2, len(pieces), 16):
        for part in tokenizer(pieces[i:i + 16], add_special_tokens=False)["input_ids"]:
            ids += part
    return ids


def _texts_of(batch, text_field: str) -> list[str]:
    if isinstance(batch, list):  # a list of records (dicts): the column of text_field
        batch = {text_field: [r[text_field] for r in batch]} if all(text_field in r for r in batch) else \
            (batch[0] if batch else {text_field: []})
    if text_field not in batch:
        raise DataError(f"data.text_field={text_field!r} is not in the records (fields: {sorted(batch)}); "
                        f"set data.text_field to one of them")
    return [str(t) if t is not None else "" for t in batch[text_field]]


def _tokenize_shard(job: tuple) -> tuple[int, int]:
    """Tokenize records [lo, hi) of `dataset` into `<out>.bin` (tokens + EOS per document, `dtype`) and
    `<out>.len.npy` (int64 document lengths, EOS included). Runs in a worker process or in-process."""
    dataset, lo, hi, tokenizer, text_field, out, dtype = job
    eos, lengths, n_tokens = tokenizer.eos_token_id, [], 0
    with open(f"{out}.bin", "wb") as f:
        for start in range(lo, hi, 1000):
            texts = _texts_of(dataset[start:min(start + 1000, hi)], text_field)
            long = [i for i, t in enumerate(texts) if len(t) > CHUNK_CHARS]
            ids = tokenizer([t if i not in long else "" for i, t in enumerate(texts)],
                            add_special_tokens=False)["input_ids"]
            for i in long:
                ids[i] = encode_document(tokenizer, texts[i])
            for doc in ids:
                doc.append(eos)  # every document ends with EOS, a normal target (as packing.pack)
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=sum(map(len, ids)))
            f.write(flat.tobytes())
            lengths += map(len, ids)
            n_tokens += flat.size
    np.save(f"{out}.len.npy", np.asarray(lengths, dtype=np.int64))
    return hi - lo, n_tokens


def _processes(num_proc, n_records: int, n_bytes: int) -> int:
    """Tokenizing processes: data.num_proc (null: the CPUs this process may use, at most 8), but one for a
    small corpus (starting a process costs ~3 s of imports)."""
    if n_records < 2 * SHARD_RECORDS and n_bytes < 64 << 20:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(num_proc) if num_proc else min(cpus, 8), math.ceil(n_records / SHARD_RECORDS)))


def build_corpus(dataset, tokenizer, text_field: str, out_dir: Path, key: dict, num_proc=None,
                 n_bytes: int = 0) -> dict:
    """Tokenize every record of `dataset` (a `datasets.Dataset` or a list of dicts) into `out_dir` (created;
    its parent must be writable). Returns meta (also written to out_dir/meta.json, last)."""
    out_dir.mkdir(parents=True)
    vocab = max(len(tokenizer), (tokenizer.eos_token_id or 0) + 1)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    n = len(dataset)
    procs = _processes(num_proc, n, n_bytes)
    per = SHARD_RECORDS if procs > 1 else max(n, 1)
    jobs = [(dataset, lo, min(lo + per, n), tokenizer, text_field, str(out_dir / f"part{i:05d}"), dtype)
            for i, lo in enumerate(range(0, n, per))]
    t0, done_tokens = time.perf_counter(), 0
    progress = _progress(len(jobs), n_bytes)
    if procs > 1:
        # spawn: the parent may hold torch/tokenizers threads that fork would copy mid-state
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            for _, tokens in pool.imap(_tokenize_shard, jobs):
                done_tokens += tokens
                progress(done_tokens)
    else:
        for job in jobs:
            done_tokens += _tokenize_shard(job)[1]
            progress(done_tokens)
    # the parts, in record order, into one token file and one array of document starts
    lengths = [np.load(out_dir / f"part{i:05d}.len.npy") for i in range(len(jobs))]
    with open(out_dir / "tokens.bin", "wb") as dst:
        for i in range(len(jobs)):
            part = out_dir / f"part{i:05d}.bin"
            with open(part, "rb") as src:
                while chunk := src.read(64 << 20):
                    dst.write(chunk)
            part.unlink()
            (out_dir / f"part{i:05d}.len.npy").unlink()
        dst.flush()
        os.fsync(dst.fileno())
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    starts = np.zeros(len(all_lengths) + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=starts[1:])
    np.save(out_dir / "docs.npy", starts)
    seconds = time.perf_counter() - t0
    meta = {"key": key, "dtype": np.dtype(dtype).name, "n_tokens": int(starts[-1]), "n_docs": int(len(all_lengths)),
            "processes": procs, "seconds": round(seconds, 2), "text_bytes": n_bytes}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    fsync_dir(out_dir)
    return meta


def _progress(n_jobs: int, n_bytes: int):
    """A progress line on stderr (tqdm when it is a terminal), by tokens written."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with datasets
        return lambda tokens: None
    bar = tqdm(total=n_bytes or None, unit="B", unit_scale=True, desc="llmlab: tokenizing", disable=None,
               leave=False)

    def update(tokens: int) -> None:
        bar.n = min(tokens, bar.total) if bar.total else tokens  # bytes ~ tokens for the scale of the bar
        bar.refresh()

    return update


# --------------------------------------------------------------------------------------------------
# Open or build, under a lock
# --------------------------------------------------------------------------------------------------
def check_corpus(path: Path, key: dict) -> str | None:
    """Why the corpus at `path` cannot be trusted (None: it can): incomplete, another key, sizes that do not
    match meta.json (a file truncated or replaced)."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return "it has no meta.json (its build did not finish)"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        return f"its meta.json is unreadable ({err})"
    if meta.get("key") != key:
        return f"it was made for another key ({_key_changes(meta.get('key') or {}, key)} differ)"
    tokens = path / "tokens.bin"
    expected = meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
    if not tokens.is_file() or tokens.stat().st_size != expected:
        size = tokens.stat().st_size if tokens.is_file() else "no"
        return f"tokens.bin has {size} bytes, meta.json says {expected}"
    try:
        starts = np.load(path / "docs.npy", mmap_mode="r")
    except (OSError, ValueError) as err:
        return f"docs.npy is unreadable ({err})"
    if starts.shape != (meta["n_docs"] + 1,) or int(starts[-1]) != meta["n_tokens"]:
        return f"docs.npy does not match meta.json ({starts.shape[0]} entries)"
    return None


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepared(root: Path, name: str, key: dict, records, tokenizer, text_field: str, num_proc=None,
             n_bytes: int = 0) -> Path:
    """The directory of the corpus for `key`, tokenized now if no intact one exists. `records()` gives the
    records (called only when tokenizing: a cache hit reads no data file)."""
    writable(root)
    path = root / f"{name}-{key_digest(key)}"
    with _locked(root / f"{path.name}.lock"):
        if path.is_dir():
            problem = check_corpus(path, key)
            if problem is None:
                return path
            log.warning("prepared corpus %s cannot be trusted: %s; tokenizing again", path, problem)
            remove(path)
        else:
            _say_why_new(root, name, key)
        tmp = root / f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        remove(tmp)
        log.info("tokenizing %s into %s (once: later runs and every rank read it)", name, path)
        try:
            meta = build_corpus(records(), tokenizer, text_field, tmp, key, num_proc, n_bytes)
        except BaseException:
            remove(tmp)
            raise
        os.rename(tmp, path)
        fsync_dir(root)
        rate = meta["text_bytes"] / 1e6 / max(meta["seconds"], 1e-9)
        log.info("prepared %s: %s tokens in %s documents, %.1f s (%.1f MB/s of text, %d process(es)), %.2f bytes "
                 "per token on disk", path.name, f"{meta['n_tokens']:,}", f"{meta['n_docs']:,}", meta["seconds"],
                 rate, meta["processes"], np.dtype(meta["dtype"]).itemsize)
        return path


def _say_why_new(root: Path, name: str, key: dict) -> None:
    """The newest corpus of the same name and the same records (the same split) under another key: say what changed
    (the new key gets its own directory; the old one stays for runs that still use it)."""
    for other in sorted(root.glob(f"{name}-*/meta.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            old = json.loads(other.read_text()).get("key") or {}
        except (OSError, ValueError):
            continue
        if old.get("records") == key.get("records"):
            log.info("tokenizing again (%s changed since %s)", _key_changes(old, key), other.parent.name)
            return


# --------------------------------------------------------------------------------------------------
# Reading blocks
# --------------------------------------------------------------------------------------------------
class TokenBlocks(torch.utils.data.Dataset):
    """Blocks of `block_size` tokens from tokens [start, end) of a prepared corpus, as `packing.pack` yields them:
    {"input_ids", "segment_ids", "position_ids"}, each a LongTensor (block_size,). The last partial block is
    dropped. Each process opens the file itself (DataLoader workers included) and reads a block with one pread."""

    def __init__(self, path: Path, block_size: int, start: int = 0, end: int | None = None):
        meta = json.loads((Path(path) / "meta.json").read_text())
        self.path, self.block_size = Path(path), int(block_size)
        self.dtype = np.dtype(meta["dtype"])
        self.start = int(start)
        self.end = int(meta["n_tokens"] if end is None else end)
        self.n_docs = meta["n_docs"]
        self._fd = self._pid = None
        self._starts = None

    @property
    def n_tokens(self) -> int:
        return self.end - self.start

    def __len__(self) -> int:
        return max(self.n_tokens, 0) // self.block_size

    def __getstate__(self):  # a DataLoader worker opens its own file
        return {**self.__dict__, "_fd": None, "_pid": None, "_starts": None}

    def _open(self):
        if self._pid != os.getpid():
            self._fd = os.open(self.path / "tokens.bin", os.O_RDONLY)
            self._starts = np.load(self.path / "docs.npy", mmap_mode="r")  # (n_docs + 1,) int64
            self._pid = os.getpid()

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        self._open()
        T, a = self.block_size, self.start + i * self.block_size
        raw = os.pread(self._fd, T * self.dtype.itemsize, a * self.dtype.itemsize)
        ids = torch.from_numpy(np.frombuffer(raw, dtype=self.dtype).astype(np.int64))  # (T,)
        # documents starting inside (a, a + T): each starts a new segment whose positions restart at 0; the
        # first segment (a document that began at or before a) counts its positions from a, as pack() does
        lo = int(np.searchsorted(self._starts, a, side="right"))
        hi = int(np.searchsorted(self._starts, a + T, side="left"))
        inner = np.asarray(self._starts[lo:hi], dtype=np.int64) - a  # (k,) offsets in (0, T)
        seg = np.zeros(T, dtype=np.int64)
        seg[inner] = 1
        seg = np.cumsum(seg)  # (T,) segment of each token
        seg_start = np.concatenate([[0], inner])[seg]  # (T,) where each token's segment starts in the block
        pos = np.arange(T, dtype=np.int64) - seg_start
        return {"input_ids": ids, "segment_ids": torch.from_numpy(seg), "position_ids": torch.from_numpy(pos)}


# --------------------------------------------------------------------------------------------------
# A data group's pretraining splits
# --------------------------------------------------------------------------------------------------
def holdout_of(data_cfg) -> str:
    """data.holdout: `random` (data.val_fraction of the records, shuffled with data.seed: nanoGPT's OpenWebText
    split) or `tail` (the last val_fraction of the tokens: nanoGPT's shakespeare split). null: tail for .txt files
    read by document (a book is one record: there is nothing to draw at random), random otherwise."""
    chosen = data_cfg.get("holdout")
    if chosen:
        return str(chosen)
    files = data_cfg.get("train_files") if data_cfg.get("source") == "text" else None
    files = [files] if isinstance(files, str) else list(files or [])
    txt = bool(files) and all(str(f).lower().endswith(".txt") for f in files)
    return "tail" if txt and (data_cfg.get("sample_by") or "document") == "document" else "random"


def lm_splits(data_cfg, tokenizer, block_size: int, seed: int) -> tuple[TokenBlocks, TokenBlocks]:
    """The train and validation blocks of a text or (non-streamed) hub source, from prepared corpora (tokenized
    here on first use)."""
    from llmlab.data.sources import check_files, load_files, load_split

    d = data_cfg
    root, fingerprint = cache_root(d), tokenizer_fingerprint(tokenizer)
    text_field = d.get("text_field") or "text"
    seed = d.get("seed", seed)

    def corpus(name: str, identity, records, selection, n_bytes: int) -> Path:
        key = {"version": VERSION, "files": identity, "tokenizer": fingerprint, "text_field": text_field,
               "sample_by": d.get("sample_by"), "records": selection}
        return prepared(root, name, key, records, tokenizer, text_field, d.get("num_proc"), n_bytes)

    def blocks(path: Path, setting: str, start: int = 0, end: int | None = None) -> TokenBlocks:
        out = TokenBlocks(path, block_size, start, end)
        if len(out) == 0:
            raise DataError(f"{setting} gave {out.n_tokens:,} tokens: no complete block of data.block_size="
                            f"{block_size} tokens; add text or lower data.block_size")
        return out

    holdout = holdout_of(d)
    if d.source == "text":
        train_paths = check_files(d.train_files, "data.train_files")
        name, size = train_paths[0].stem, sum(p.stat().st_size for p in train_paths)
        whole = lambda paths, setting: (lambda: load_files(paths, setting, d.get("sample_by")))  # noqa: E731
        if d.get("val_files"):
            val_paths = check_files(d.val_files, "data.val_files")
            train = corpus(name, file_identity(train_paths), whole(train_paths, "data.train_files"), "all", size)
            val = corpus(val_paths[0].stem, file_identity(val_paths), whole(val_paths, "data.val_files"), "all",
                         sum(p.stat().st_size for p in val_paths))
            return blocks(train, "data.train_files"), blocks(val, "data.val_files")
        if holdout == "tail":
            path = corpus(name, file_identity(train_paths), whole(train_paths, "data.train_files"), "all", size)
            n = TokenBlocks(path, block_size).n_tokens
            cut = n - math.ceil(n * d.val_fraction)
            return (blocks(path, "data.train_files (the first part)", 0, cut),
                    blocks(path, f"data.train_files (its last data.val_fraction={d.val_fraction})", cut, n))
        identity = file_identity(train_paths)
    else:  # hub, read whole: its own fingerprint (datasets') names the version of the data
        identity = None
        size = 0
        name = str(d.name).replace("/", "--")
    out = []
    for split in ("train", "validation"):
        share = (1 - d.val_fraction) if split == "train" else d.val_fraction
        if identity is None:  # hub: the split's records are needed to know its fingerprint
            records = load_split(d, "lm", split, seed)
            path = corpus(name, {"hub": records._fingerprint}, lambda r=records: r, split, 0)
        else:
            selection = {"split": split, "val_fraction": d.val_fraction, "seed": seed}
            path = corpus(name, identity, lambda s=split: load_split(d, "lm", s, seed), selection, int(size * share))
        out.append(blocks(path, "data.train_files" if split == "train" else "the validation split"))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------
# Examples of the other stages (sft, rm, dpo, kto, ppo prompts), cached the same way
# --------------------------------------------------------------------------------------------------
def cached_examples(data_cfg, data_format: str, format_args: dict, tokenizer, split: str, seed: int, build):
    """The examples `build()` makes for one split of a text or (non-streamed) hub source, tokenized once: saved
    under data.cache_dir as examples.pt (torch.save of the format's list; read back with weights_only=True) and
    keyed like a corpus plus the format, its settings and the tokenizer's chat template. Prompt/response data is
    small next to a pretraining corpus (LIMA: 1,000 examples), so it is a list in memory, not token files."""
    from llmlab.data.sources import check_files, load_split
    from llmlab.nodes import to_plain

    d = data_cfg
    seed = d.get("seed", seed)
    if d.source == "text":
        own_files = split != "train" and d.get("val_files")
        paths = check_files(d.val_files if own_files else d.train_files,
                            "data.val_files" if own_files else "data.train_files")
        identity, name = file_identity(paths), paths[0].stem
        selection = "all" if own_files or (split == "train" and d.get("val_files")) else \
            {"split": split, "val_fraction": d.val_fraction, "seed": seed}
        records = None
    else:
        records = load_split(d, data_format, split, seed)
        identity, name, selection = {"hub": records._fingerprint}, str(d.name).replace("/", "--"), split
    key = {"version": VERSION, "files": identity, "records": selection, "format": data_format,
           "format_args": to_plain(format_args), "sample_by": d.get("sample_by"),
           "tokenizer": tokenizer_fingerprint(tokenizer), "chat_template": getattr(tokenizer, "chat_template", None)}
    root = cache_root(d)
    writable(root)
    path = root / f"{name}-{data_format}-{key_digest(key)}"
    with _locked(root / f"{path.name}.lock"):
        meta_file = path / "meta.json"
        if meta_file.is_file() and (path / "examples.pt").is_file():
            try:
                if json.loads(meta_file.read_text()).get("key") == key:
                    return torch.load(path / "examples.pt", weights_only=True)
            except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
                log.warning("cached examples %s cannot be read (%s: %s); tokenizing again", path, type(err).__name__, err)
        examples = build(records if records is not None else load_split(d, data_format, split, seed))
        tmp = root / f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        remove(tmp)
        tmp.mkdir()
        torch.save(examples, tmp / "examples.pt")
        (tmp / "meta.json").write_text(json.dumps({"key": key, "n_examples": len(examples)}, indent=1))
        fsync_dir(tmp)
        remove(path)
        os.rename(tmp, path)
        return examples

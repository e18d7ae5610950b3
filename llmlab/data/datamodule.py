"""The one LightningDataModule: a source (data group) x a format (chosen by the stage)."""
from __future__ import annotations

import itertools
import math

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler

from llmlab.data.corpus import cached_examples, lm_splits
from llmlab.data.formats import FORMATS, TARGET_COUNTS
from llmlab.data.sources import load_split
from llmlab.errors import DataError
from llmlab.stages.interface import Stage


PERMUTATION_IN_MEMORY = 1 << 22  # up to 4M samples an epoch's order is a tensor (32 MB); beyond, computed per index


class FeistelPermutation:
    """A seeded pseudo-random permutation of range(n) computed one index at a time in O(1) memory: a 4-round
    Feistel network on the smallest even power of two >= n, cycle-walking indices that land outside range(n)
    (each step is a bijection, so the walk returns inside). Used instead of `torch.randperm(n)` when an epoch's
    order as a tensor would cost more memory than the rest of the data pipeline (8 bytes x n: 256 MB for a 2 GB
    corpus in 64-token blocks)."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # bits per half: 2 * half bits cover n
        self.mask = (1 << self.half) - 1
        g = torch.Generator().manual_seed(seed)
        self.keys = [int(k) for k in torch.randint(0, 1 << 31, (4,), generator=g)]

    def _round(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            # a multiply-xorshift mix of (right, key) as the round function
            f = ((right * 0x9E3779B1) ^ k) & 0xFFFFFFFF
            f = ((f ^ (f >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
            left, right = right, left ^ (f & self.mask)
        return (left << self.half) | right

    def __getitem__(self, i: int) -> int:
        x = self._round(int(i))
        while x >= self.n:
            x = self._round(x)
        return x

    def __len__(self) -> int:
        return self.n


class ResumableSampler(Sampler[int]):
    """Deterministic, rank-sharded, endless order that can start mid-stream.

    Global sample position p (counted over all ranks) maps to index perm_e[p % n] with
    e = p // n and perm_e a permutation seeded by (seed, e). Rank r takes positions r, r+W, r+2W, ...
    Resuming sets `start` to the number of samples already consumed globally, derived from the
    restored global step, so training continues exactly where it stopped. In a run, `start` is a
    function (the trainer's consumed samples) read each time an iteration begins: after a resume,
    Lightning's restored in-epoch batch count can end an "epoch" before this sampler's pass ends (a
    checkpoint of a resumed run, whose sampler covered only the remaining steps), and a position derived
    from epoch numbers or passes then repeated or skipped data (seen: stop at 3, resume and stop at 7,
    resume: steps 8-10 differed from the uninterrupted run). The consumed count is always right.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 start=0, length: int | None = None):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size, self.start = rank, world_size, start
        self.length = length if length is not None else math.ceil(n / world_size)
        self.epoch = 0
        self.passes = 0  # complete passes (a fixed `start`: each pass continues the global order)

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this each epoch; the position does not depend on it (see the class docstring)."""
        self.epoch = epoch

    def _order(self, epoch: int):
        if not self.shuffle:
            return range(self.n)
        if self.n > PERMUTATION_IN_MEMORY:  # a prepared corpus of millions of blocks: no n-sized tensor
            return FeistelPermutation(self.n, self.seed * 100003 + epoch)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def __iter__(self):
        if callable(self.start):  # samples consumed globally so far (the trainer's global step)
            p = self.start() + self.rank
        else:
            p = self.start + self.passes * self.length * self.world_size + self.rank
        epoch, order = -1, None
        for _ in range(self.length):
            if p // self.n != epoch:
                epoch = p // self.n
                order = self._order(epoch)
            yield int(order[p % self.n])
            p += self.world_size
        self.passes += 1

    def __len__(self) -> int:
        return self.length


def global_sums(counts: list[dict[str, int]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Sum per-micro-batch counts ({name: int}, same names in each) over the micro-batches and, when
    torch.distributed is initialized, over all ranks (a collective: every rank calls it in lockstep).
    Returns {name: 0-dim int64 tensor on the CPU}."""
    names = sorted(counts[0])
    totals = torch.tensor([sum(c[k] for c in counts) for k in names], dtype=torch.int64, device=device)  # (K,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return dict(zip(names, totals.cpu()))


class StepTargets:
    """The train dataloader, with each micro-batch carrying the global target counts of its optimizer step.

    Reads one optimizer step ahead: `accumulate` micro-batches (the remainder at the end, grouped as
    Lightning groups accumulation: consecutive from the first batch), counts their loss targets with
    `count` (formats.TARGET_COUNTS), sums them over the micro-batches and ranks, and adds them to every
    micro-batch as `step_<name>` (e.g. `step_tokens`, `step_pairs`). Stages divide their loss sums by
    these, so a step is one big batch's token-weighted mean however it is split (HF Trainer's
    `num_items_in_batch`). Sample order is the wrapped loader's: resume is unaffected. The look-ahead
    holds only token-id batches; ranks must yield the same number of batches (ResumableSampler does).
    """

    def __init__(self, loader: DataLoader, count, accumulate: int, device: torch.device | str = "cpu"):
        self.loader, self.count, self.accumulate, self.device = loader, count, max(int(accumulate), 1), device

    @property
    def sampler(self):  # Lightning calls sampler.set_epoch through these
        return self.loader.sampler

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler

    def __len__(self) -> int:  # TypeError for iterable datasets, as DataLoader (Lightning checks has_len)
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while group := list(itertools.islice(batches, self.accumulate)):
            totals = global_sums([self.count(b) for b in group], self.device)
            for batch in group:
                batch.update({f"step_{name}": total for name, total in totals.items()})
                yield batch


class LLMDataModule(L.LightningDataModule):
    def __init__(self, data_cfg, data_format: str, tokenizer, seed: int = 0, format_kwargs: dict | None = None):
        super().__init__()
        self.cfg, self.data_format, self.tokenizer, self.seed = data_cfg, data_format, tokenizer, seed
        keys = ("block_size", "prompt_template", "record_format", "pack_examples", "train_on")
        fmt_args = {k: v for k, v in data_cfg.items() if k.endswith("_field") or k in keys}
        fmt_args.update(format_kwargs or {})
        self.fmt_args = fmt_args
        self.format = FORMATS[data_format](tokenizer=tokenizer, **fmt_args)
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None):
        if self.train_set is None and self.data_format == "lm" and self.cfg.source in ("text", "hub") \
                and not self.cfg.get("streaming"):
            # pretraining on files or a hub dataset: tokenized once into a prepared corpus (data/corpus.py) that
            # this and every later run, and every rank, read by offset: memory flat in the corpus size
            self.train_set, self.val_set = lm_splits(self.cfg, self.tokenizer, self.format.block_size, self.seed)
        if self.train_set is None and self.cfg.source in ("text", "hub") and not self.cfg.get("streaming"):
            # the other stages' examples: tokenized once too (data/corpus.py cached_examples)
            self.train_set, self.val_set = (
                cached_examples(self.cfg, self.data_format, self.fmt_args, self.tokenizer, split, self.seed,
                                lambda records, s=split: self.format.build(records, s))
                for split in ("train", "validation"))
        if self.train_set is None:
            self.train_set = self.format.build(load_split(self.cfg, self.data_format, "train", self.seed), "train")
            self.val_set = self.format.build(load_split(self.cfg, self.data_format, "validation", self.seed),
                                             "validation")
            if not isinstance(self.train_set, IterableDataset) and len(self.train_set) == 0:
                raise DataError("the training split is empty: check data.train_files / data.n_train")

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def consumed_samples(self) -> int:
        """Samples consumed globally before this fit started (non-zero when resuming)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        _, world = self._rank_world()
        # a stage that takes several optimizer steps per batch (ppo, grpo) says how many batches it consumed
        module = trainer.lightning_module
        done = module.batches_done() if isinstance(module, Stage) else None
        batches = done if done is not None else trainer.global_step * trainer.accumulate_grad_batches
        return batches * self.cfg.batch_size * world

    def train_dataloader(self):
        loader = self._train_loader()
        count, trainer = TARGET_COUNTS.get(self.data_format), self.trainer
        if count is None or trainer is None:
            return loader
        return StepTargets(loader, count, trainer.accumulate_grad_batches, trainer.strategy.root_device)

    def _train_loader(self) -> DataLoader:
        rank, world = self._rank_world()
        if isinstance(self.train_set, IterableDataset):
            self.train_set.rank, self.train_set.world_size = rank, world
            self.train_set.skip = self.consumed_samples() // world
            self.train_set.batch_size = self.cfg.batch_size
            return DataLoader(self.train_set, batch_size=self.cfg.batch_size, collate_fn=self.format.collate,
                              num_workers=self.cfg.num_workers)
        trainer = self.trainer
        max_steps = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else None
        length = None
        if max_steps:  # one long "epoch" covering the whole run: step counts stay simple across resumes
            accumulate = trainer.accumulate_grad_batches
            length = (max_steps - trainer.global_step) * accumulate * self.cfg.batch_size
        sampler = ResumableSampler(len(self.train_set), self.seed, shuffle=True, rank=rank, world_size=world,
                                   start=self.consumed_samples, length=length)
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, sampler=sampler,
                          collate_fn=self.format.collate, num_workers=self.cfg.num_workers, drop_last=True)

    def val_dataloader(self):
        rank, world = self._rank_world()
        if isinstance(self.val_set, IterableDataset):
            self.val_set.rank, self.val_set.world_size = rank, world
            return DataLoader(self.val_set, batch_size=self.cfg.val_batch_size, collate_fn=self.format.collate)
        # each rank takes a disjoint strided shard; metrics are reduced across ranks (no duplicates)
        shard = range(rank, len(self.val_set), world)  # a range, not a list: 8 bytes per block add up
        return DataLoader(torch.utils.data.Subset(self.val_set, shard), batch_size=self.cfg.val_batch_size,
                          collate_fn=self.format.collate, num_workers=self.cfg.num_workers)

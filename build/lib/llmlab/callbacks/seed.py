"""SeedPerRank: each rank its own random stream once training starts."""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class SeedPerRank(L.Callback):
    """Several processes: reseed each rank's torch / numpy / random generators with `seed + global rank`
    when training starts, so dropout masks and sampling (PPO rollouts) differ between ranks instead of
    repeating the same random stream on different data. The model was built before this, with the same
    seed on every rank (ZeRO-3 partitions each rank's own copy, so the copies must be identical); the
    data order comes from the sampler's own seeded generator. One process: nothing changes."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_start(self, trainer, pl_module):
        if trainer.world_size > 1:
            rank_seed = self.seed + trainer.global_rank
            random.seed(rank_seed)
            np.random.seed(rank_seed % 2**32)
            torch.manual_seed(rank_seed)

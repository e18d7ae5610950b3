"""`release_freed_memory=true` (conf/train.yaml, llmlab.distributed.memory.release_freed_memory): glibc hands freed blocks
of 128 KiB or more back to the OS at once, so resident memory follows live tensors.

The behaviour is glibc's, so it is tested on glibc itself: tensors freed between ones still alive (the holes
a training step leaves in the heap) stay resident by default and are returned with the option. A run with the
option trains exactly as without it.
"""
from __future__ import annotations

import json

import pytest

from llmlab.distributed.memory import glibc
from tests.conftest import FAST, assert_ok, run_python

pytestmark = pytest.mark.skipif(glibc() is None, reason="glibc's mallopt (Linux) is what the option sets")

# 16 MB allocated and freed first: glibc's dynamic mmap threshold rises to it, so the 1 MB tensors after it
# come from the heap (as a step's mid-sized activations do); every other one stays alive, so the freed
# ones are holes the heap cannot trim.
HOLES = """
import json, sys, torch
from llmlab.distributed.memory import release_freed_memory, status_mb
if sys.argv[1] == "release":
    release_freed_memory()
big = torch.ones(4 * 1024 * 1024); del big
kept, freed = [], []
for i in range(160):
    (kept if i % 2 else freed).append(torch.ones(256 * 1024))  # 1 MB each
before = status_mb("RssAnon")
del freed
print(json.dumps({"returned_mb": before - status_mb("RssAnon")}))
"""


@pytest.mark.parametrize("mode", ["default", "release"])
def test_freed_heap_blocks_are_returned_only_with_the_option(mode):
    proc = run_python("-c", HOLES, mode)
    assert proc.returncode == 0, proc.stderr[-2000:]
    returned = json.loads(proc.stdout.strip().splitlines()[-1])["returned_mb"]
    if mode == "release":
        assert returned > 70  # the 80 freed 1 MB tensors (measured: 80)
    else:
        assert returned < 10  # glibc keeps them for reuse (measured: 0)


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_run_with_the_option_trains_the_same(cli, tmp_path):
    histories = {}
    for value in ("false", "true"):
        run = cli(*FAST, "trainer.log_every_n_steps=1", "callbacks.samples=null", "callbacks.hf_export=null",
                  f"release_freed_memory={value}", run_dir=tmp_path / value)
        assert_ok(run)
        assert ("release_freed_memory: blocks >= 128 KiB" in run.stdout + run.stderr) == (value == "true")
        histories[value] = json.loads((tmp_path / value / "history.json").read_text())["train/loss"]
    assert histories["true"] == histories["false"] and len(histories["true"]) == 6

"""bench/readme_numbers.py --kind: the README's numbers are measured with the CPU kernels of machine kinds not at
hand (AMD without AVX-512, Intel with and without AVX-512), through each library's own dispatch switch. These
tests check that each kind's environment makes ATen, oneDNN and MKL take the kernels it claims, read from the
libraries themselves (torch's capability, oneDNN's verbose ISA line) and from results that differ where the
kernels differ (a float sum's order)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab.distributed.devices import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import readme_numbers  # after the path insert: bench/ is not a package

# what one process reports: torch's ATen capability, oneDNN's ISA, and digests of an MKL sgemm (fp32 matmul) and an
# ATen softmax and a oneDNN GELU (GPT-2's activation), whose bits depend on the kernels' vector width and blocking
PROBE = """
import hashlib, json, torch
torch.manual_seed(0)
a, b, x = torch.randn(257, 511), torch.randn(511, 129), torch.randn(64, 1000)
digest = lambda t: hashlib.md5(t.numpy().tobytes()).hexdigest()
print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability(), "mm": digest(a @ b),
                  "softmax": digest(torch.softmax(x, -1)),
                  "gelu": digest(torch.nn.functional.gelu(x))}))  # GELU runs in oneDNN (its verbose ISA line)
"""


CPUINFO = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def probe(kind: str) -> dict:
    env = {**os.environ, **readme_numbers.kind_env(kind), "OMP_NUM_THREADS": "1", "ONEDNN_VERBOSE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    result = json.loads(lines[-1])
    result["onednn"] = next((line.split("isa:", 1)[1] for line in lines if ",isa:" in line), "")
    return result


@pytest.fixture(scope="module")
def kinds() -> dict[str, dict]:
    if "avx2" not in cpu_flags(CPUINFO) or not shutil.which("cc"):
        pytest.skip("the emulated kinds need a host with AVX2 and a C compiler (MKL's vendor-check shim)")
    return {kind: probe(kind) for kind in readme_numbers.KINDS}


def test_avx2_kinds_run_avx2_kernels_in_aten_and_onednn(kinds):
    for kind in ("amd-avx2", "intel-avx2"):
        assert kinds[kind]["aten"] == "AVX2", (kind, kinds[kind])
        assert kinds[kind]["onednn"].strip() == "Intel AVX2", (kind, kinds[kind])


def test_mkl_takes_its_intel_path_only_for_the_intel_kinds(kinds):
    # MKL's Intel and non-Intel sgemm paths are different kernels: the same matmul's bits differ between them, and
    # agree within a vendor whatever ATen and oneDNN run (an fp32 matmul goes to MKL alone)
    assert kinds["amd-avx2"]["mm"] != kinds["intel-avx2"]["mm"]
    if {"avx512f", "avx512_bf16"} <= cpu_flags(CPUINFO):
        assert kinds["intel-avx512"]["mm"] != kinds["amd-avx2"]["mm"]
        assert kinds["intel-avx512"]["aten"] == "AVX512"
        native_is_intel = "GenuineIntel" in CPUINFO
        assert (kinds["native"]["mm"] == kinds["intel-avx512"]["mm"]) == native_is_intel


def test_aten_and_onednn_width_change_results_so_kinds_are_distinct_numbers(kinds):
    # the point of the kinds: a different vector width sums in another order, so a run's numbers move with it
    if "avx512f" in cpu_flags(CPUINFO):
        assert kinds["native"]["softmax"] != kinds["amd-avx2"]["softmax"]
        assert kinds["native"]["gelu"] != kinds["amd-avx2"]["gelu"]
    for op in ("softmax", "gelu"):  # ATen's and oneDNN's AVX2 kernels on both
        assert kinds["amd-avx2"][op] == kinds["intel-avx2"][op]


def test_each_kind_builds_its_own_bases():
    caches = {readme_numbers.kind_env(kind).get("LLMLAB_CACHE") for kind in readme_numbers.KINDS}
    assert len(caches) == len(readme_numbers.KINDS)


def test_summary_groups_kinds_and_counts_an_adopted_candidate_as_the_default(tmp_path):
    rows = [  # kto's default on two kinds; rm's candidate that became its default, and another candidate
        {"stage": "kto", "seed": s, "threads": 1, "status": "finished", "commit": "x", "val_reward_accuracy": acc,
         **({"kind": "amd-avx2"} if kind else {})} for s, acc, kind in [(0, 0.52, False), (1, 0.55, False),
                                                                         (0, 0.49, True)]
    ] + [{"stage": "rm", "seed": 0, "threads": 1, "status": "finished", "commit": "x", "val_accuracy": acc,
          "overrides": list(over)} for acc, over in [(0.9, readme_numbers.RECIPES["rm"][1]), (0.1, ["a=1"])]]
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = readme_numbers.summary(out).splitlines()[2:]
    assert lines == ["| rm | native | 1 | 0 | pairwise accuracy 0.900-0.900 | 1/1 |",
                     "| kto | native | 1 | 0, 1 | reward accuracy 0.520-0.550 | 2/2 |",
                     "| kto | amd-avx2 | 1 | 0 | reward accuracy 0.490-0.490 | 0/1 |"]

"""bench/gpu_acceptance.sh's CPU dry part (fast tier): argument handling, the plan, the result file. The checks
themselves need a CUDA GPU (issue 23 point 4); no GPU has been lent to this project yet."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_acceptance as ga  # after the path insert: bench/ is not a package


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_acceptance.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={**ga.env(), "PYTHON": sys.executable})


def test_checks_fit_the_eight_minute_budget():
    assert sum(limit for limit, _ in ga.CHECKS.values()) == ga.BUDGET_S == 480
    assert set(ga.RUNNERS) == set(ga.CHECKS)


def test_dry_run_plans_every_check_and_writes_lines_for_results_md(tmp_path):
    out = tmp_path / "gpu.md"
    proc = sh("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "6 checks planned, 480 s at most" in proc.stdout
    text = out.read_text()
    assert text.startswith("## gpu_acceptance: DRY RUN on ") and "nothing ran on a GPU" in text.splitlines()[0]
    assert "    bash bench/gpu_acceptance.sh --out gpu.md" in text  # the command, as RESULTS.md sections give it
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "not run (dry run)" in ln]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == list(ga.CHECKS)
    assert not list(tmp_path.glob("*.partial"))  # written under a temporary name, renamed into place


def test_only_picks_checks_in_the_given_order(tmp_path):
    out = tmp_path / "some.md"
    assert sh("--dry-run", "--only", "mfu,attention", "--out", str(out)).returncode == 0
    assert [ln.split(" | ")[0].lstrip("| ") for ln in out.read_text().splitlines() if "not run (dry run)" in ln] == \
        ["mfu", "attention"]


@pytest.mark.parametrize("args,named", [
    (["--dry-run", "--only", "mfu,flops"], "--only=mfu,flops: unknown check flops"),
    (["--dry-run", "--only", ","], "(none named)"),
    (["--dry-run", "--out", "/no/such/dir/x.md"], "--out=/no/such/dir/x.md"),
    (["--dry-run", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "no CUDA GPU is visible here"),  # this machine: the real run refuses, --dry-run is the way
])
def test_bad_arguments_are_one_line_exit_2(args, named, tmp_path):
    if not args:
        args = ["--out", str(tmp_path / "x.md")]
    proc = sh(*args)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmlab: error: ") and named in lines[0], proc.stderr
    assert not (tmp_path / "x.md").exists()


def test_result_file_is_rewritten_whole_after_each_check(tmp_path):
    """A real run writes after every check: a run cut short keeps the rows it measured."""
    out = tmp_path / "r.md"
    lines = ga.header("NVIDIA H100 80GB HBM3", dry=False)
    first = [ga.row("mfu", "GPT-2 124M", "1,000 tokens/s", "-", None)]
    ga.write(out, lines, first)
    ga.write(out, lines, [*first, ga.row("grpo", "rollout", "timed out after 60 s", "<= 60 s", False)])
    text = out.read_text()
    assert text.startswith("## gpu_acceptance on NVIDIA H100 80GB HBM3 (")
    assert text.count("| mfu |") == 1 and "| grpo | rollout | timed out after 60 s | <= 60 s | FAILED |" in text


def test_mfu_counts_six_flops_per_parameter_plus_attention():
    assert ga.flops_per_token(124_000_000, 12, 768, 1024) == 6 * 124_000_000 + 12 * 12 * 768 * 1024


def test_a_check_past_its_limit_is_killed_with_its_runs_and_reported(monkeypatch, tmp_path):
    """Each check runs in its own process group under its own limit: here grpo gets 4 s (its llmlab run needs
    more), so it is killed, its llmlab child with it, and the row says so."""
    monkeypatch.setitem(ga.CHECKS, "grpo", (4, "GRPO rollout samples/s (tiny model)"))
    rows = ga.run_check("grpo", tmp_path)
    assert rows[0]["measured"] == "timed out after 4 s" and rows[0]["result"] == "FAILED"
    assert rows[-1]["what"] == "time"
    left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True).stdout
    assert not left.strip(), left

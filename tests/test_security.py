"""Security: no credential on disk or in logs, checkpoints unpickled with weights_only=True, and code
shipped with a model never runs (trust_remote_code stays off). Real CLI runs throughout."""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_module

SECRET, PASSWORD = "SECRET123", "PASSW0RD9"
TINY = ["trainer.max_steps=2", "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "data.n_train=64",
        "data.n_val=16", "trainer.enable_progress_bar=false", "model.config.n_layer=1", "model.config.n_embd=32",
        "model.config.n_head=2"]


_py = functools.partial(run_module, env={"OMP_NUM_THREADS": "1"})  # `python -m module ...`, one thread


def _files_with(root: Path, *needles: str) -> list[str]:
    """Every file under root (hidden ones included, binary too) that contains one of the needles."""
    hits = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if any(n.encode() in data for n in needles):
                hits.append(str(p.relative_to(root)))
    return hits


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """A real tiny run given an API key and a database URL with a password as overrides; the run dir
    is job 0 of a sweep dir so llmlab.report can read it."""
    sweep = tmp_path_factory.mktemp("secret") / "sweep"
    run_dir = sweep / "0"
    proc = _py("llmlab.run", *TINY, f"+wandb_api_key={SECRET}", f"+db_url=postgresql://me:{PASSWORD}@db.example/x",
               f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep, run_dir, proc


def test_redact_masks_secret_keys_and_url_passwords():
    from llmlab.redact import redact, redact_text

    assert redact_text(f"+wandb_api_key={SECRET} lr=1") == "+wandb_api_key=*** lr=1"
    assert redact_text(f"storage: mysql://me:{PASSWORD}@host/db") == "storage: mysql://me:***@host/db"
    assert redact_text(f"HF_TOKEN={SECRET} hf_token: {SECRET}") == "HF_TOKEN=*** hf_token: ***"
    cfg = {"wandb_api_key": SECRET, "model": {"tokenizer": "builtin", "pad_token_id": 0},
           "data": {"max_new_tokens": 8}, "db": {"password": PASSWORD, "url": f"postgresql://u:{PASSWORD}@h/d"}}
    assert redact(cfg) == {"wandb_api_key": "***", "model": {"tokenizer": "builtin", "pad_token_id": 0},
                           "data": {"max_new_tokens": 8}, "db": {"password": "***", "url": "postgresql://u:***@h/d"}}


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_secret_overrides_reach_no_file_and_no_log(secret_run):
    """config_resolved.yaml, Hydra's .hydra/*.yaml, run.log, the console, and llmlab.report's outputs."""
    sweep, run_dir, proc = secret_run
    assert (run_dir / "config_resolved.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert "wandb_api_key" in (run_dir / "config_resolved.yaml").read_text()  # the key stays, its value goes
    report = _py("llmlab.report", str(sweep))
    assert report.returncode == 0, report.stderr[-3000:]
    assert (sweep / "report.md").is_file() and (sweep / "report.csv").is_file()
    assert _files_with(sweep, SECRET, PASSWORD) == []
    for out in (proc.stdout, proc.stderr, report.stdout, report.stderr):
        assert SECRET not in out and PASSWORD not in out


@pytest.mark.slow  # over ~7 s (tests/conftest.py LLMLAB_TEST_TIMES, 2026-11-24)
def test_optuna_sweep_writes_no_secret(tmp_path):
    """A real 2-trial Optuna sweep on an sqlite storage with a secret override: optimization_results.yaml,
    multirun.yaml, every job dir and the logs hold no secret. (SQLAlchemy refuses an sqlite URL with
    user:pass, so the storage URL password is covered by the redaction of `storage` in the results file
    through redact_text, tested above and here on the stored value.)"""
    sweep = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = _py("llmlab.run", "-m", "hparams_search=pretrain_lr", "hydra.sweeper.n_trials=2",
               f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={sweep}", f"+wandb_api_key={SECRET}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import yaml

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["n_complete"] == 2 and results["storage"] == storage
    assert _files_with(sweep, SECRET) == []
    assert SECRET not in proc.stdout + proc.stderr

    from llmlab.redact import redact_text

    assert redact_text(f"postgresql://me:{PASSWORD}@db/optuna") == "postgresql://me:***@db/optuna"


def test_sbatch_echo_masks_credentials():
    """The job-log echo of slurm/*.sbatch masks credential overrides (bash, its own function)."""
    for script in ("single_node.sbatch", "multi_node.sbatch"):
        text = (ROOT / "slurm" / script).read_text()
        func = re.search(r"^redacted\(\) \{.*?^\}", text, re.S | re.M).group(0)
        out = subprocess.run(["bash", "-c", f'{func}\nredacted "$@"', "x", f"+wandb_api_key={SECRET}",
                              f"hydra.sweeper.storage=postgresql://me:{PASSWORD}@h/db", "trainer.max_steps=5"],
                             capture_output=True, text=True, check=True).stdout
        assert SECRET not in out and PASSWORD not in out and "trainer.max_steps=5" in out, out
        assert '$(redacted "$@")' in text


def test_every_torch_load_is_weights_only():
    """Static: each torch.load in llmlab/ and hydra_plugins/ passes weights_only=True."""
    calls = []
    for root in ("llmlab", "hydra_plugins"):
        for path in (ROOT / root).rglob("*.py"):
            for m in re.finditer(r"torch\.load\((.*?)\)\s*(?:\[|$|\n)", path.read_text(), re.S):
                calls.append((str(path.relative_to(ROOT)), m.group(1)))
    assert calls, "no torch.load found: the pattern is stale"
    assert [c for c in calls if "weights_only=True" not in c[1]] == []


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_export_refuses_a_pickled_payload(secret_run, tmp_path):
    """A crafted checkpoint whose unpickling would run a command: llmlab.export refuses it (exit 2)
    without running it."""
    import torch

    _, run_dir, _ = secret_run
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Payload()}, evil)
    proc = _py("llmlab.export", str(run_dir), "--ckpt", str(evil), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("llmlab: error: --ckpt")
    assert "Traceback" not in proc.stderr and not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_export_refuses_a_deepspeed_dir_with_a_payload(secret_run, tmp_path):
    """DeepSpeed unpickles its shards with weights_only=False: llmlab.export lists their globals first
    and refuses a shard that would run a command."""
    import torch

    _, run_dir, _ = secret_run
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    shards = tmp_path / "last.ckpt" / "checkpoint"
    shards.mkdir(parents=True)
    torch.save({"module": {}, "x": Payload()}, shards / "mp_rank_00_model_states.pt")
    (tmp_path / "last.ckpt" / "latest").write_text("checkpoint")  # structurally whole: the pickle scan refuses it
    proc = _py("llmlab.export", str(run_dir), "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "refusing to unpickle" in proc.stderr.strip().splitlines()[-1] and not marker.exists()


def _custom_code_model(root: Path, marker: Path) -> Path:
    """A local model dir whose config.json maps to Python files that would create `marker` on import."""
    d = root / "custom_model"
    d.mkdir()
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n" \
           f"class EvilConfig(PretrainedConfig):\n    model_type = 'evilnet'\n"
    (d / "configuration_evil.py").write_text(code)
    (d / "modeling_evil.py").write_text(code)
    (d / "config.json").write_text(json.dumps({
        "model_type": "evilnet", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}}))
    return d


def test_remote_code_in_a_model_dir_never_runs(tmp_path):
    marker = tmp_path / "ran_remote_code"
    model_dir = _custom_code_model(tmp_path, marker)
    run = _py("llmlab.run", "model.init=pretrained", f"model.pretrained={model_dir}", f"hydra.run.dir={tmp_path / 'r'}")
    assert run.returncode == 2 and "auto_map" in run.stderr.strip().splitlines()[-1], run.stderr[-3000:]
    gen = _py("llmlab.generate", str(model_dir), "prompt=x")
    assert gen.returncode == 2 and "auto_map" in gen.stderr.strip().splitlines()[-1], gen.stderr[-3000:]
    trusted = _py("llmlab.run", "model.trust_remote_code=true", f"hydra.run.dir={tmp_path / 'r2'}")
    assert trusted.returncode == 2 and "model.trust_remote_code=true" in trusted.stderr, trusted.stderr[-3000:]
    # the loaders themselves (past the checks) pass trust_remote_code=False: transformers refuses the dir
    from omegaconf import OmegaConf

    from llmlab.models.build import build_model

    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(OmegaConf.create({"init": "pretrained", "pretrained": str(model_dir),
                                      "trust_remote_code": True, "dtype": None}))
    assert not marker.exists()

"""Every setting typed and bounded in one place (llmlab/checks: settings.py top-level, trainer.py, data.py), and
each strategy x peft x precision rule in one home: a bad value is refused with the setting named, a good one is
accepted, all with the config alone (`check_settings`, no torch). Fast: composed configs, plus a few real CLI
refusals (one `llmlab: error:` line, exit 2)."""
from __future__ import annotations

import re

import pytest

from llmlab.checks import entry as checks
from llmlab.errors import ConfigError
from tests.conftest import CONF, run_python
from tests.test_config import bases_without_building, compose_resolved  # noqa: F401  (fixture)

# a file, so nothing can be created under it (tests run as root: chmod would not stop a write)
UNWRITABLE = "/etc/hostname/run"


@pytest.fixture(scope="module")
def txt(tmp_path_factory):
    """A local training file ({txt} in the overrides below)."""
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("one line of text\nanother line\n")
    return str(path)


def settings(*overrides, txt: str = ""):
    """checks.check_settings on the config the CLI would compose (hydra run dir and interpolations resolved)."""
    cfg, _ = compose_resolved([o.replace("{txt}", txt) for o in overrides])
    checks.check_settings(cfg)
    return cfg


# (overrides, the setting the one-line error must name)
REFUSED = [
    # top-level settings (checks/settings.py)
    (["seed=-1"], "seed=-1"),
    (["seed=abc"], "seed='abc'"),
    (["seed=1.5"], "seed=1.5"),
    (["stop_at_step=0"], "stop_at_step=0"),
    (["dry_run=maybe"], "dry_run='maybe'"),
    (["compile=max-autotune"], "compile='max-autotune'"),
    (["release_freed_memory=1"], "release_freed_memory=1"),
    (["resume=sometimes"], "resume='sometimes'"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt"),
    (["ckpt_path=5"], "ckpt_path=5"),
    (["resume_allow=data.batch_size"], "resume_allow="),
    ([f"hydra.run.dir={UNWRITABLE}"], f"paths.output_dir={UNWRITABLE}"),
    ([f"paths.output_dir={UNWRITABLE}/x"], f"paths.output_dir={UNWRITABLE}/x"),
    # trainer (checks/trainer.py)
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
    (["trainer.gradient_clip_val=big"], "trainer.gradient_clip_val='big'"),
    (["+trainer.gradient_clip_algorithm=nrm"], "trainer.gradient_clip_algorithm='nrm'"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0"),
    (["trainer.limit_val_batches=-1"], "trainer.limit_val_batches=-1"),
    (["trainer.limit_val_batches=1.5"], "trainer.limit_val_batches=1.5"),
    (["+trainer.limit_train_batches=all"], "trainer.limit_train_batches='all'"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.val_check_interval=2.5"], "trainer.val_check_interval=2.5"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["trainer.devices=many"], "trainer.devices='many'"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0"),
    (["trainer.precision=bf17-mixed"], "trainer.precision='bf17-mixed'"),
    (["trainer.accelerator=tpuu"], "trainer.accelerator='tpuu'"),
    (["trainer.num_sanity_val_steps=-2"], "trainer.num_sanity_val_steps=-2"),
    (["trainer.max_bad_steps=0"], "trainer.max_bad_steps=0"),
    (["trainer.enable_progress_bar=yes"], "trainer.enable_progress_bar='yes'"),
    (["precision=16-mixed"], "precision=16-mixed"),  # fp16 needs a GPU: one rule for every strategy
    (["precision=16-mixed", "strategy=zero2"], "precision=16-mixed"),
    # data (checks/data.py)
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["data.n_train=0"], "data.n_train=0"),
    (["data.n_val=0"], "data.n_val=0"),
    (["data.val_batch_size=0"], "data.val_batch_size=0"),
    (["data.seed=-5"], "data.seed=-5"),
    (["data.source=local"], "data.source='local'"),
    (["data.record_format=json"], "data.record_format='json'"),
    (["data.pack_examples=sometimes"], "data.pack_examples='sometimes'"),
    (["data=text", "data.train_files={txt}", "data.val_fraction=0"], "data.val_fraction=0"),
    (["data=text", "data.train_files={txt}", "data.val_fraction=1.0"], "data.val_fraction=1.0"),
    (["data=text", "data.train_files={txt}", "data.val_fraction=half"], "data.val_fraction='half'"),
    (["data=text", "data.train_files={txt}", "data.val_files={txt}", "data.val_fraction=-0.1"],
     "data.val_fraction=-0.1"),
    # peft with the config alone (checks/model.py), now before torch is imported
    (["peft.method=lorra"], "peft.method='lorra'"),
    (["peft=lora", "peft.r=0"], "peft.r=0"),
    (["peft=prefix"], "peft=prefix prepends virtual tokens"),
]


@pytest.mark.parametrize("overrides,named", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_bad_value_is_refused_naming_the_setting(overrides, named, txt):
    with pytest.raises(ConfigError, match=re.escape(named)) as err:
        settings(*overrides, txt=txt)
    assert "\n" not in str(err.value)


ACCEPTED = [
    ["seed=0"], ["stop_at_step=5"], ["stop_at_step=null"], ["dry_run=true"], ["compile=false"],
    ["release_freed_memory=false"], ["resume=auto"], ["resume=null"], ["resume_allow=[data.batch_size]"],
    ["trainer.gradient_clip_val=0"], ["trainer.gradient_clip_val=0.5"], ["trainer.gradient_clip_val=null"],
    ["+trainer.gradient_clip_algorithm=value"], ["+trainer.gradient_clip_algorithm=norm"],
    ["trainer.log_every_n_steps=1"], ["trainer.limit_val_batches=0"], ["trainer.limit_val_batches=0.25"],
    ["trainer.limit_val_batches=1.0"], ["+trainer.limit_train_batches=10"], ["trainer.max_epochs=3"],
    ["trainer.max_epochs=-1"], ["trainer.val_check_interval=0.5"], ["trainer.accumulate_grad_batches=4"],
    ["trainer.devices=2"], ["trainer.devices=auto"], ["trainer.devices=[0,1]"], ["trainer.devices=-1"],
    ["trainer.num_nodes=2"], ["precision=bf16-mixed"], ["precision='32'"], ["trainer.num_sanity_val_steps=-1"],
    ["trainer.deterministic=warn"],
    ["data.num_workers=2"], ["data.n_train=1"], ["data.n_val=1"],
    ["data=text", "data.train_files={txt}", "data.block_size=64", "data.val_fraction=0.1"],
    ["data=text", "data.train_files={txt}", "data.block_size=64", "data.val_files={txt}", "data.val_fraction=0"],
    ["data=hub", "data.name=some/dataset", "data.block_size=64", "data.val_fraction=0.01"],
    ["peft=lora"], ["peft=prefix", "data.packing=concat"],
]


@pytest.mark.parametrize("overrides", ACCEPTED, ids=" ".join)
def test_good_value_is_accepted(overrides, tmp_path, txt):
    settings(*overrides, f"hydra.run.dir={tmp_path / 'run'}", txt=txt)


def test_output_dir_that_exists_or_can_be_created_is_accepted(tmp_path):
    (tmp_path / "existing").mkdir()
    settings(f"hydra.run.dir={tmp_path / 'existing'}")
    settings(f"paths.output_dir={tmp_path / 'not' / 'yet'}")
    assert not (tmp_path / "not").exists()  # checked, not created


def test_settings_checks_import_no_torch():
    """check_settings stays config-only: the new tables and the peft settings import no torch."""
    code = ("import sys; import llmlab.run; from hydra import compose, initialize_config_dir\n"
            "from llmlab.checks import entry\n"
            f"with initialize_config_dir({str(CONF)!r}, version_base='1.3'):\n"
            "    cfg = compose('train', overrides=['peft=lora', 'data.num_workers=1'])\n"
            "entry.check_settings(cfg)\n"
            "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")
    proc = run_python("-c", code, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ---- each strategy x peft x precision rule in one home (found from its config group)

def test_each_rule_has_one_home():
    """The rules moved together are reachable only where their group's file says."""
    from llmlab.checks import callbacks, model, strategy, trainer
    from llmlab.evaluation import harness
    from llmlab.models import peft

    assert not hasattr(peft, "check_fits") and hasattr(model, "check_peft_targets")  # PEFT targets: model.py
    assert not hasattr(harness, "check_eval_callbacks") and hasattr(callbacks, "check_eval_callbacks")
    assert not hasattr(strategy, "check_precision") and hasattr(trainer, "check_precision")  # precision x device
    assert not hasattr(model, "check_model_settings") and not hasattr(model, "check_peft_numbers")


def test_peft_x_strategy_rules_live_in_check_run():
    from llmlab.checks.strategy import check_run

    cfg, _ = compose_resolved(["peft=lora_int8", "strategy=zero3"])
    with pytest.raises(ConfigError, match="peft=lora_int8 with strategy=zero3"):
        check_run(cfg)
    cfg, _ = compose_resolved(["strategy=zero2", "++strategy.load_full_weights=true"])
    with pytest.raises(ConfigError, match="strategy.load_full_weights=true only applies to ZeRO-3"):
        check_run(cfg)
    cfg, _ = compose_resolved(["strategy=zero3", "++strategy.load_full_weights=true"])
    check_run(cfg)


def test_peft_targets_are_checked_on_the_meta_model():
    from llmlab.checks.model import check_peft

    cfg, _ = compose_resolved(["peft=lora", "peft.target_modules=[q_proj]"])
    with pytest.raises(ConfigError, match=r"peft.target_modules=\['q_proj'\].*match no linear layer"):
        check_peft(cfg)
    check_peft(compose_resolved(["peft=lora"])[0])


# ---- the real CLI: one line, exit 2, the setting named

CLI_CASES = [
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
    (["seed=-1"], "seed=-1"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    ([f"paths.output_dir={UNWRITABLE}"], f"paths.output_dir={UNWRITABLE}"),
]


@pytest.mark.parametrize("overrides,named", CLI_CASES, ids=[c[1] for c in CLI_CASES])
def test_cli_refuses_with_one_line(cli, overrides, named):
    run = cli(*overrides, env={"OMP_NUM_THREADS": "1"}, timeout=120)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr
    assert len(lines) >= 1 and lines[-1].startswith("llmlab: error: ") and named in lines[-1], run.stderr[-3000:]
    assert sum(ln.startswith("llmlab: error:") for ln in lines) == 1


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_cli_refuses_a_run_dir_hydra_cannot_create(key):
    """Hydra makes the run dir before llmlab's checks: an impossible one is refused before Hydra starts."""
    from tests.conftest import run_module

    proc = run_module("llmlab.run", f"{key}={UNWRITABLE}", timeout=120, env={"OMP_NUM_THREADS": "1"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == [lines[-1]] and lines[-1].startswith(f"llmlab: error: {key}={UNWRITABLE}: "), proc.stderr[-3000:]

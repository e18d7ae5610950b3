"""experiments/: every study's commands still compose (Hydra's compose API, as `--cfg job` would, plus
llmlab's config-only checks) and every study README shows a plot that exists. Fast: no training runs."""
from __future__ import annotations

import importlib.util
import re

import pytest

from llmlab.checks import entry as checks
from tests.conftest import ROOT
from tests.test_config import bases_without_building, compose_resolved, stand_ins  # noqa: F401  (fixtures)

EXPERIMENTS = ROOT / "experiments"
# experiments/common.py is the studies' helper (not a package): loaded under its own name, sys.path untouched
_spec = importlib.util.spec_from_file_location("llmlab_experiments_common", EXPERIMENTS / "common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
read_commands = _common.read_commands

STUDIES = sorted(p.name for p in EXPERIMENTS.iterdir() if p.is_dir() and (p / "README.md").exists())
COMMANDS = [(study, label, overrides) for study in STUDIES for label, overrides in read_commands(study)]


def test_the_four_studies_are_there():
    assert {"peft_methods", "alignment_methods", "strategies", "cpu_bf16"} <= set(STUDIES)
    for study in STUDIES:
        for name in ("README.md", "run.sh", "collect.py", "commands.txt"):
            assert (EXPERIMENTS / study / name).exists(), f"experiments/{study}/{name}"
        labels = [label for label, _ in read_commands(study)]
        assert labels and len(labels) == len(set(labels)), (study, labels)


@pytest.fixture
def bases_stand_in(stand_ins, bases_without_building):
    """`${llmlab_base:x}` -> test_config's stand-in causal LM directory (its config.json is what the
    config-only checks read). The cached base itself exists only if some earlier run in this cache built it,
    so checking against it made this test depend on which tests ran before it (it failed in a suite where no
    test built tiny-sft-short)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("llmlab_base", lambda name: str(stand_ins / "lm"), replace=True)
    yield  # bases_without_building puts the real resolver back


@pytest.mark.parametrize("study,label,overrides", COMMANDS, ids=[f"{s}/{lbl}" for s, lbl, _ in COMMANDS])
def test_study_command_composes_and_passes_checks(study, label, overrides, bases_stand_in):
    cfg, plain = compose_resolved(overrides)
    checks.check_settings(cfg)  # the config-only rules a run applies first (no torch, no weights)
    # the overrides took effect (a typo'd key would have failed above; a group choice is this file)
    for item in overrides:
        key, _, value = item.lstrip("+").partition("=")
        if key in plain["hydra"]["runtime"]["choices"]:
            assert plain["hydra"]["runtime"]["choices"][key] == value.strip("'"), item


@pytest.mark.parametrize("study", STUDIES)
def test_readme_links_a_png_that_exists_and_a_command(study):
    text = (EXPERIMENTS / study / "README.md").read_text()
    pngs = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert pngs, f"experiments/{study}/README.md links no PNG"
    for png in pngs:
        assert (EXPERIMENTS / study / png).is_file(), png
    assert f"experiments/{study}/run.sh" in text  # the one command that reproduces it


def test_a_broken_command_is_caught():
    """The compose check above is not a formality: a mistyped group choice fails it."""
    with pytest.raises(Exception, match="loraa"):
        compose_resolved(["stage=sft", "peft=loraa"])

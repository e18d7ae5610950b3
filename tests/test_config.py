"""Every file under conf/ composes AND resolves (interpolations included); every experiment and every
pipeline stage passes llmlab's checks (no network, no weights); the conf tree is what users are told.

`${llmlab_base:<name>}` (the cached tiny bases) would build a base for minutes on first use; here it is
replaced, for the duration of each test, by a resolver that returns the very path the real one
returns (`bases.base_path`: same name, same fingerprint) without building it.
"""
from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from llmlab.checks import entry as checks
from llmlab.checks.stage import STAGES
from llmlab.checks.trainer import check_precision
from llmlab.errors import ConfigError
from llmlab.models import bases
from tests.conftest import CONF, ROOT, run_module, run_python

# groups whose choice is made in a root's defaults list, not with `group=name` on the command line
ROOT_ONLY_GROUPS = {"hydra"}
# groups the README table lists by example only (named recipes, data presets, searches)
README_EXAMPLES_ONLY = {"experiment", "hparams_search", "data", "pipeline"}


def conf_files() -> list[str]:
    """Every yaml under conf/, from the file system (the list the tests below cover)."""
    return sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))


def group_choices() -> list[tuple[str, str]]:
    return [(f.rsplit("/", 1)[0], f.rsplit("/", 1)[1].removesuffix(".yaml")) for f in conf_files() if "/" in f]


def choice_override(group: str, choice: str) -> str:
    return f"{group}='{choice}'" if choice.isdigit() else f"{group}={choice}"


@pytest.fixture(autouse=True)
def bases_without_building():
    """`${llmlab_base:x}` -> the cached base's path, not built; the real resolver is put back after."""
    from llmlab import run  # registers the real resolver on import

    OmegaConf.register_new_resolver("llmlab_base", lambda name: str(bases.base_path(name)), replace=True)
    yield
    OmegaConf.register_new_resolver("llmlab_base", run._base_resolver, use_cache=True, replace=True)


def compose_resolved(overrides, config_name="train") -> tuple:
    """Compose like the CLI does and resolve every interpolation (hydra:, oc.env:, llmlab_base:)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    # what Hydra fills in when it launches a job (a sweep's first job), and what @hydra.main does:
    # `${hydra:...}` resolves against the hydra node
    with open_dict(cfg):
        cfg.hydra.job.num, cfg.hydra.job.id = 0, "0"
        cfg.hydra.runtime.output_dir = str(cfg.hydra.run.dir)
    HydraConfig.instance().set_config(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return cfg, plain


def _missing(plain, prefix="") -> list[str]:
    """Keys still `???` after resolution (required values the user must give)."""
    if isinstance(plain, dict):
        return [m for k, v in plain.items() for m in _missing(v, f"{prefix}{k}.")]
    if isinstance(plain, list):
        return [m for i, v in enumerate(plain) for m in _missing(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if plain == "???" else []


# ------------------------------------------------------------------------------------------------
# the conf tree against what users are told (independent of the walk above)
# ------------------------------------------------------------------------------------------------


def _help_groups() -> dict[str, set[str]]:
    """`python -m llmlab.run --help`: the groups and choices Hydra's config repository lists."""
    out = run_module("llmlab.run", "--help", timeout=120)
    assert out.returncode == 0, out.stderr
    section = out.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    return {m.group(1): set(m.group(2).split(", "))
            for m in re.finditer(r"^([\w/]+): (.+)$", section, re.M)}


def _readme_groups() -> dict[str, set[str]]:
    """README.md's `Config groups` table: the choices named in each row's second column."""
    text = (ROOT / "README.md").read_text().split("## Config groups")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `([\w/]+)` \| (.*?) \|", text, re.M)
    # a choice is a backticked name outside parentheses: `hub` (with `streaming`) names `hub`
    return {g: set(re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", cell))) for g, cell in rows}


def _hydra_main_roots() -> set[str]:
    """The root configs the entry points load (`@hydra.main(config_name=...)` in llmlab/*.py)."""
    roots = set()
    for path in (ROOT / "llmlab").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "config_name" and isinstance(node.value, ast.Constant):
                roots.add(f"{node.value.value}.yaml")
    return roots


def test_conf_tree_is_what_help_readme_and_entry_points_say():
    """A file added without being listed (orphan) or listed without a file (missing) fails here."""
    files = conf_files()
    walked: dict[str, set[str]] = {}
    for group, choice in group_choices():
        walked.setdefault(group, set()).add(choice)
    # root files: exactly the configs an entry point loads
    assert {f for f in files if "/" not in f} == _hydra_main_roots() == {"train.yaml", "pipeline.yaml", "eval.yaml"}
    # every group and choice Hydra offers on --help is a file, and every file is offered
    help_groups = _help_groups()
    assert {g: c for g, c in walked.items() if g.split("/")[0] not in ROOT_ONLY_GROUPS} == help_groups
    # the README table: every choice it names exists; groups it enumerates are complete
    readme = _readme_groups()
    assert set(readme) >= set(help_groups) - {"paths", "pipeline"}, sorted(set(help_groups) - set(readme))
    for group, named in readme.items():
        if group in README_EXAMPLES_ONLY:
            assert named <= walked[group], (group, named - walked[group])
        else:
            assert named == walked[group], (group, named ^ walked[group])


# ------------------------------------------------------------------------------------------------
# every file composes and resolves
# ------------------------------------------------------------------------------------------------

# data files with required values (`???`) the user gives on the command line
REQUIRED = {("data", "text"): ["data.train_files=/data/train.jsonl"], ("data", "hub"): ["data.name=some/dataset"],
            ("reward", "model"): ["reward.model.path=/runs/rm"], ("reward", "user"): ["reward.user.fn=my_rewards:score"],
            ("model", "hf"): ["model.pretrained=Qwen/Qwen2.5-0.5B-Instruct"],
            ("experiment", "nanogpt_shakespeare_char"): ["data.train_files=/data/tinyshakespeare.txt"]}


# pipeline and eval choices belong to their own roots (pipeline.yaml, eval.yaml): tests/test_pipeline.py and
# tests/test_eval.py compose them
@pytest.mark.parametrize("group,choice", [gc for gc in group_choices() if gc[0] not in ("pipeline", "eval")], ids=str)
def test_conf_file_composes_and_resolves(group, choice):
    overrides = [] if group in ROOT_ONLY_GROUPS else [choice_override(group, choice)]
    cfg, plain = compose_resolved([*overrides, *REQUIRED.get((group, choice), [])])
    assert plain["hydra"]["runtime"]["choices"][group] == choice  # this file is the one composed
    assert _missing({k: v for k, v in plain.items() if k != "hydra"}) == []
    assert plain["stage"]["name"] in STAGES
    if group == "model" and str(plain["model"].get("pretrained", "")).startswith(str(bases.cache_dir())):
        assert plain["model"]["pretrained"].endswith("/hf")  # a cached base's path, fingerprinted


def test_missing_required_value_is_reported():
    """The `???` check above can fail: data=text without train_files leaves one."""
    _, plain = compose_resolved(["data=text"])
    assert _missing(plain["data"]) == ["train_files"]


# ------------------------------------------------------------------------------------------------
# experiments and pipelines validate
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_hub_probe(monkeypatch):
    """The course recipes name hub models (facebook/opt-1.3b, ...): hub.check_hub asks whether the hub
    is reachable, a fact of the machine, not of the recipe (tests/test_bad_inputs.py tests that probe).
    Here every other rule of the recipe is validated."""
    monkeypatch.setattr(checks, "check_hub", lambda cfg: None)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Directories standing in for earlier runs' outputs: a causal LM and a reward model (tiny random GPT-2s with
    their weights: the checks read configs and check that the weight files are whole)."""
    from transformers import AutoConfig, GPT2ForSequenceClassification, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("stand_ins")
    GPT2ForSequenceClassification(AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=259,
                                                       num_labels=1)).save_pretrained(root / "rm")
    GPT2LMHeadModel(AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=259)).save_pretrained(
        root / "lm")
    (root / "text.jsonl").write_text('{"text": "' + "To be, or not to be. " * 50 + '"}\n')  # one document
    (root / "text.txt").write_text("To be, or not to be.\n" * 50)  # a play in one .txt file
    return root


def experiment_names():
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


# what an experiment leaves to the caller (the pipeline passes {rm} to the PPO recipe)
EXPERIMENT_NEEDS = {"rlhf_opt1.3b": lambda d: [f"stage.reward_model={d / 'rm'}"],
                    # the caller's copy of tinyshakespeare
                    "nanogpt_shakespeare_char": lambda d: [f"data.train_files=[{d / 'text.txt'}]"]}


@pytest.mark.parametrize("name", experiment_names())
def test_experiment_resolves_and_validates(name, stand_ins, no_hub_probe):
    cfg, plain = compose_resolved([f"experiment={name}", *EXPERIMENT_NEEDS.get(name, lambda d: [])(stand_ins)])
    assert _missing({k: v for k, v in plain.items() if k != "hydra"}) == []
    assert plain["task_name"] == name
    validate(cfg)


def validate(cfg) -> None:
    """checks.check_config: every rule (hub data/models are opened only at run time). A GPU recipe on a
    machine without one is refused for that reason alone: its other rules are checked one by one."""
    import torch

    from llmlab.checks.model import check_model, check_peft
    from llmlab.checks.strategy import check_run
    from llmlab.checks.preference import check_preference

    if str(cfg.trainer.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            checks.check_config(cfg)
        for check in (check_precision, check_run, check_model, check_peft, check_preference):
            check(cfg)
    else:
        checks.check_config(cfg)


def test_experiment_check_can_fail(stand_ins, no_hub_probe):
    """The PPO recipe without its reward model is refused: validation above is not a formality."""
    cfg, _ = compose_resolved(["experiment=rlhf_opt1.3b"])
    with pytest.raises(ConfigError, match="no reward source"):
        checks.check_config(cfg)


def pipeline_names():
    return sorted(p.stem for p in (CONF / "pipeline").glob("*.yaml"))


@pytest.mark.parametrize("name", pipeline_names())
def test_pipeline_resolves_and_every_stage_validates(name, stand_ins, no_hub_probe):
    from llmlab.pipeline import substitute

    _, plain = compose_resolved([f"pipeline={name}"], config_name="pipeline")
    stages = plain["pipeline"]["stages"]
    names = [s["name"] for s in stages]
    assert plain["pipeline"]["name"] == name and len(set(names)) == len(names)
    assert plain["out_dir"].endswith(f"pipelines/{name}")
    # each stage's model input stands in as the kind of model it is (a reward model for stage.reward_model)
    outputs = {n: str(stand_ins / ("rm" if n == "rm" or n.endswith("_rm") else "lm")) for n in names}
    for i, stage in enumerate(stages):
        refs = {r for o in stage["overrides"] for r in re.findall(r"\{(\w+)\}", str(o))}
        assert refs <= set(names[:i]), (stage["name"], refs)  # only earlier stages are referred to
        overrides = [substitute(str(o), outputs) for o in stage["overrides"]]
        cfg, run_plain = compose_resolved(overrides)
        if _unbuilt_base(cfg.model.get("pretrained")):  # a cached tiny base not built yet: a config stands in
            cfg, run_plain = compose_resolved([*overrides, f"model.pretrained={stand_ins / 'lm'}"])
        assert _missing({k: v for k, v in run_plain.items() if k != "hydra"}) == [], stage["name"]
        validate(cfg)


def _unbuilt_base(path) -> bool:
    from llmlab.models import bases

    return bool(path) and str(path).startswith(str(bases.cache_dir())) and not Path(str(path)).exists()


def test_help_and_cfg_are_fast_and_do_not_import_torch():
    code = ("import sys, runpy; sys.argv=['llmlab.run', '--cfg', 'job'];\n"
            "try:\n    runpy.run_module('llmlab.run', run_name='__main__')\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported on the --cfg path'\n")
    t0 = time.perf_counter()
    proc = run_python("-c", code)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert "stage:" in proc.stdout
    assert elapsed < 5, elapsed  # target under 2 s on an idle machine; margin for a loaded CI box
    help_ = run_module("llmlab.run", "--help")
    assert help_.returncode == 0 and "stage: " in help_.stdout and "peft: " in help_.stdout


# ------------------------------------------------------------------------------------------------
# the cached bases' fingerprint covers everything that determines them
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def project_copy(tmp_path):
    import shutil

    for tree in ("llmlab", "conf"):
        shutil.copytree(ROOT / tree, tmp_path / tree, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


# files the old fingerprint left out (a change there could pass on a stale cached base)
WAS_LEFT_OUT = ["llmlab/stages/common.py", "llmlab/losses/__init__.py", "llmlab/models/build.py", "llmlab/train.py",
                "conf/model/tiny.yaml", "conf/trainer/default.yaml", "conf/data/builtin.yaml", "conf/train.yaml"]


@pytest.mark.slow  # over ~7 s of CPU: the fast tier (plain pytest) stays under 5 min serially (2026-12-07)
def test_base_fingerprint_changes_with_any_source_or_config(project_copy):
    digest = bases.sources_digest.__wrapped__  # uncached: files change under it here
    assert digest(project_copy) == digest(ROOT)  # by content, not location
    before = digest(project_copy)
    for rel in WAS_LEFT_OUT:
        path = project_copy / rel
        original = path.read_text()
        path.write_text(original + ("\n_changed = 1\n" if rel.endswith(".py") else "\nchanged_value: 1\n"))
        assert digest(project_copy) != before, rel
        path.write_text(original)
    assert digest(project_copy) == before
    # a comment or docstring edit keeps the cached bases
    for rel in ("llmlab/models/build.py", "conf/model/tiny.yaml"):
        path = project_copy / rel
        path.write_text("# a reworded comment\n" + path.read_text())
    models = project_copy / "llmlab/models/build.py"
    models.write_text(models.read_text().replace('"""Build tokenizers', '"""Reworded: build tokenizers', 1))
    assert digest(project_copy) == before
    # the names' fingerprints differ (their recipes do) and each is stable
    prints = {name: bases._fingerprint(name) for name in bases.BASES}
    assert len(set(prints.values())) == len(prints) and prints == {n: bases._fingerprint(n) for n in bases.BASES}


def test_zero_choices_are_zero1_plus_their_differences():
    """conf/strategy/zero2|3|3_offload compose zero1.yaml (`defaults:`): each composes to zero1's node,
    in the same key order, with only its stage, name, offloading and (stage 3) its parameter-gathering
    sizes changed."""
    base = compose_resolved(["strategy=zero1"])[1]["strategy"]
    stage3 = {"config_overrides": {"zero_optimization": {k: "auto" for k in (
        "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
        "stage3_max_reuse_distance")}}}
    differences = {"zero2": {"name": "zero2", "stage": 2}, "zero3": {"name": "zero3", "stage": 3, **stage3},
                   "zero3_offload": {"name": "zero3_offload", "stage": 3, "offload_optimizer": True,
                                     "offload_parameters": True, **stage3}}
    for choice, changed in differences.items():
        node = compose_resolved([f"strategy={choice}"])[1]["strategy"]
        assert list(node.items()) == list({**base, **changed}.items()), choice


def sbatch_usage_overrides() -> list[tuple[str, list[str]]]:
    """(template, llmlab.run overrides) of every `#   sbatch ... slurm/X.sbatch k=v ...` usage line in slurm/."""
    found = []
    for path in sorted((ROOT / "slurm").glob("*.sbatch")):
        for line in path.read_text().splitlines():
            words = line.split("#", 2)[1].split() if line.startswith("#   sbatch ") else []
            args = words[words.index(f"slurm/{path.name}") + 1:] if f"slurm/{path.name}" in words else []
            overrides = [w for w in args if "=" in w]
            if overrides:
                found.append((path.name, overrides))
    return found


@pytest.mark.parametrize("template,overrides", sbatch_usage_overrides(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_sbatch_usage_lines_name_choices_that_exist(template, overrides):
    """The usage lines of slurm/*.sbatch are commands users copy: each composes (multi_node.sbatch named
    strategy=deepspeed_zero2 and model=gpt2-medium, single_node.sbatch model=opt-1.3b: none exists)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.stage.name and cfg.model.name


def test_sbatch_usage_lines_are_found():
    assert {t for t, _ in sbatch_usage_overrides()} == {"multi_node.sbatch", "single_node.sbatch"}

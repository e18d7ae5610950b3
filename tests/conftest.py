"""Shared test helpers: run the real CLI in a subprocess and read what it wrote.

The one subprocess layer of the tests: `run_python` (python + argv from the repo root, output
captured), `run_module` (`python -m module ...`), `run_cli` / the `cli` fixture (`llmlab.run` into a
run dir, returning a `Run`). Test files use these rather than their own `subprocess.run` wrappers
(processes a test kills or talks to while they run, `Popen`, stay in the test).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import forkserver

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# the smallest settings that still exercise the whole pipeline
FAST = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
        "data.n_train=300", "data.n_val=32", "trainer.enable_progress_bar=false",
        "model.config.n_layer=2", "model.config.n_embd=32", "model.config.n_head=2"]


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path):
        self.proc, self.dir = proc, run_dir
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr

    @property
    def summary(self) -> dict:
        return json.loads((self.dir / "summary.json").read_text())


def run_python(*argv: str, timeout: float = 600, env: dict | None = None, base_env: dict | None = None,
               cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python *argv` (this interpreter) from the repo root, stdout/stderr captured as text. The child's
    environment is `base_env` (default: this process's) with `env` on top. A `-m llmlab.*` command runs as a
    fork of a warm interpreter where it can (tests/forkserver.py: why, and what is kept out)."""
    env = {**(os.environ if base_env is None else base_env), **(env or {})}
    done = forkserver.try_run(list(argv), env, Path(cwd), timeout, start=forkserver.same_imports(env, os.environ))
    if done is not None:
        return done
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def run_module(module: str, *args: str, **kw) -> subprocess.CompletedProcess:
    """`python -m module *args` (llmlab.eval, llmlab.export, llmlab.generate, ...); kw as run_python."""
    return run_python("-m", module, *args, **kw)


def run_cli(run_dir: Path, *overrides: str, module: str = "llmlab.run", timeout: int = 600, env=None) -> Run:
    """A Hydra entry point (`llmlab.run`, `llmlab.pipeline`) into `run_dir`: the Run it left."""
    proc = run_module(module, *overrides, f"hydra.run.dir={run_dir}", timeout=timeout, env=env)
    return Run(proc, Path(run_dir))


@pytest.fixture
def cli(tmp_path):
    """cli(*overrides) runs `python -m llmlab.run` into a fresh run dir under tmp_path."""
    counter = iter(range(1000))

    def _run(*overrides, run_dir: Path | None = None, **kw) -> Run:
        return run_cli(run_dir or tmp_path / f"run{next(counter)}", *overrides, **kw)

    return _run


def compose_group(group: str, choice: str):
    """The `group` node as Hydra composes `group=choice` (the file's own `defaults:` applied: e.g.
    strategy=zero2 is zero1.yaml + its changes): unresolved, detached from the root and open to new keys,
    as `OmegaConf.load` of a self-contained file would be (a plain load misses what a file composes)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(CONF), version_base="1.3"):
        node = compose("train", overrides=[f"{group}={choice}"])[group]
    return OmegaConf.create(OmegaConf.to_container(node, resolve=False))


def assert_ok(run: Run) -> None:
    assert run.returncode == 0, f"exit {run.returncode}\nSTDERR:\n{run.stderr[-4000:]}"


def _cpu_seconds() -> float:
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime
            + forkserver.child_cpu_seconds())


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: scripts/test.sh runs one worker per core
def pytest_xdist_make_scheduler(config, log):
    """Hand out work a module at a time (its module-scoped fixtures, trained models among them, are built
    once), every Slurm module as one unit (the local cluster runs one 2-task job at a time and the tests
    time their waits), in collection order (pytest_collection_modifyitems: heavy modules first).
    (xdist's own `--dist loadgroup` marks no longer group under pytest 9.2, whose Node.nodeid ignores the
    `_nodeid` that xdist 3.8 rewrites: every test became its own unit.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            return "slurm" if Path(module).name.startswith("test_slurm") else module

    config.option.loadscopereorder = False  # collection order, not xdist's "most tests first"
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The Slurm modules first (one unit that mostly waits on the cluster: it takes its own worker from the
    start, scripts/test.sh adds one), then modules with multi-process or slow tests (in file order within a
    module), so a parallel run does not end with one worker busy on a long module while the other idles."""
    def weight(item) -> int:
        names = {m.name for m in item.iter_markers()}
        return 0 if "slurm" in names else 1 if "distributed" in names else 2 if "slow" in names else 3

    first = {}
    for item in items:
        first[_module(item.nodeid)] = min(first.get(_module(item.nodeid), 3), weight(item))
    items.sort(key=lambda item: first[_module(item.nodeid)])  # stable


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """LLMLAB_TEST_TIMES=<file>: append each test's wall and CPU seconds (its own and its subprocesses') and
    how many of its commands ran as forks (tests/forkserver.py) as a JSON line. CPU seconds barely depend on
    the machine's load, so they decide a test's tier."""
    path = os.environ.get("LLMLAB_TEST_TIMES")
    wall, cpu, forked = time.perf_counter(), _cpu_seconds(), forkserver.forked_commands()
    yield
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": item.nodeid, "wall": round(time.perf_counter() - wall, 2),
                                "cpu": round(_cpu_seconds() - cpu, 2),
                                "forked": forkserver.forked_commands() - forked}) + "\n")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (byte vocabulary, 2 x 32) saved as a local pretrained model with its tokenizer:
    what QLoRA / LLM.int8 quantize as they load, and what adapters are exported against."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from llmlab.data.tokenizer import builtin_tokenizer

    out = tmp_path_factory.mktemp("tiny_gpt2")
    tok = builtin_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=256,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family_dir(model_type) -> a tiny random model of that family (tests/families.py: llama, mistral, qwen2,
    qwen3, gemma2, gemma3_text, phi3, mixtral, qwen3_moe, gpt_neox) saved with a BPE tokenizer and the
    family's real chat template; each built once per session, on first use."""
    from tests.families import build_family

    root, built = tmp_path_factory.mktemp("families"), {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = build_family(model_type, root / model_type)
        return built[model_type]

    return get

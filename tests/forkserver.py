"""A warm interpreter for the tests' `python -m llmlab.<entry> ...` commands: fork it instead of starting one.

Why: most of the suite's CPU went to starting interpreters. A fresh `python -m llmlab.run` spends ~6 CPU s
importing torch, lightning (which imports torchmetrics, scipy.signal and torch._dynamo), transformers and
peft before llmlab runs a line: a 6-step run took 10.4 s of which 7.3 s were those imports (2-vCPU AMD EPYC,
2026-12-07), and the suite starts a few hundred. This server imports those libraries once; each command is a
fork of it that then runs what `python -m` runs (`runpy._run_module_as_main`, the function the interpreter's
own -m option calls) with the command's argv, working directory, environment and its own stdout/stderr, and
exits as that interpreter would (the exception or SystemExit reaches the top level; atexit handlers run).
Still a real process running the real entry point; only the third-party imports are shared.

What a fork cannot share with a fresh interpreter, and how each is kept out:
- llmlab itself is never imported here: its import-time code and the order of its checks (before any weights
  load, most refusals before torch is imported) run in every command as they do for a user.
- The preloaded libraries read some environment variables when imported (HF_*, TORCH_*, OMP_NUM_THREADS for
  the thread pool): a command whose environment differs from the server's in anything but LLMLAB_*, WANDB_*
  (read by llmlab and by wandb when a run starts) and PYTEST_* runs as a fresh interpreter (`usable`).
- numpy's global generator is reseeded from the OS in each child (Python's `random` reseeds itself at fork).
- No tensor op runs in the server (an OpenMP pool used before a fork hangs the child).
- Warnings the preloaded imports print (torchao, bitsandbytes) go to the server's stderr once, not to every
  command's: tests that read stderr see less than a user would. The one-line-error tests
  (test_bad_inputs.py) are refusals that end before these imports in a fresh interpreter too.

LLMLAB_TEST_FORKSERVER=0 runs every command as a fresh interpreter (the behaviour before this file).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# the libraries every training/eval command imports; llmlab's own modules are left to each command
PRELOAD = ("torch", "lightning.pytorch", "transformers", "peft", "hydra", "omegaconf")
# environment variables read when a command runs, not when the preloaded libraries are imported (and pytest's
# own, PYTEST_CURRENT_TEST changing every test)
LATE_READ_PREFIXES = ("LLMLAB_", "WANDB_", "PYTEST_")


def usable(argv: list[str], env: dict[str, str], server_env: dict[str, str]) -> bool:
    """A command a server started in `server_env` can run: `-m llmlab.*`, its environment equal to the server's
    but for LATE_READ_PREFIXES, and the switch not off."""
    if os.environ.get("LLMLAB_TEST_FORKSERVER", "1") == "0" or len(argv) < 2 or argv[0] != "-m":
        return False
    if not (argv[1] == "llmlab" or argv[1].startswith("llmlab.")):
        return False
    return _import_time(env) == _import_time(server_env)


def _import_time(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(LATE_READ_PREFIXES)}


class _Client:
    """One server per test process, one command at a time (a second concurrent command, e.g. from a test's
    thread pool, runs as a fresh interpreter)."""
    proc: subprocess.Popen | None = None
    env_at_start: dict[str, str] | None = None
    lock = threading.Lock()
    outputs: Path | None = None  # where a command's stdout and stderr are written, then read back
    child_cpu_seconds = 0.0  # the forked commands' CPU, for conftest's per-test CPU record
    forked = 0  # commands run as forks
    started = 0  # servers started (a new one each time this process's environment drifted)


def _stop() -> None:
    if _Client.proc is not None:
        _Client.proc.stdin.close()  # the server reads to the end of its input, then exits
        _Client.proc.wait()
        _Client.proc = None


def child_cpu_seconds() -> float:
    return _Client.child_cpu_seconds


def forked_commands() -> int:
    return _Client.forked


def servers_started() -> int:
    return _Client.started


def try_run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess | None:
    """Run `python *argv` (from `cwd`, in `env`) as a fork of the server; None where it cannot (`usable`) or the
    server is busy: then run it fresh."""
    if not usable(argv, env, dict(os.environ)) or not _Client.lock.acquire(blocking=False):
        return None  # a command's own variables differ from this process's, or the server is busy: fresh
    try:
        running = _Client.proc is not None and _Client.proc.poll() is None
        # This process's own environment drifts as tests run code in-process (Lightning's seed_everything sets
        # PL_GLOBAL_SEED, torch._inductor TORCHINDUCTOR_CACHE_DIR, ...), and commands inherit it: a server started
        # before the drift is replaced by one started in the environment as it is now.
        if not running or _import_time(dict(os.environ)) != _import_time(_Client.env_at_start):
            _stop()
            _Client.env_at_start = dict(os.environ)
            _Client.outputs = _Client.outputs or Path(tempfile.mkdtemp(prefix="llmlab-forkserver-"))
            _Client.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, cwd=str(Path(__file__).parent),
                                            env=_Client.env_at_start)
            _Client.started += 1
        out, err = _Client.outputs / "stdout", _Client.outputs / "stderr"
        request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        _Client.proc.stdin.write((json.dumps(request) + "\n").encode())
        _Client.proc.stdin.flush()
        child = json.loads(_Client.proc.stdout.readline() or '{"pid": null}')
        if child["pid"] is None:
            raise RuntimeError("tests/forkserver.py: the server exited; LLMLAB_TEST_FORKSERVER=0 runs without it")
        timed_out = threading.Event()
        timer = threading.Timer(timeout, lambda: (timed_out.set(), os.kill(child["pid"], signal.SIGKILL)))
        timer.start()
        try:
            line = _Client.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:  # the server died with its child: the child's status is lost
            raise RuntimeError("tests/forkserver.py: the server exited; LLMLAB_TEST_FORKSERVER=0 runs without it")
        ended = json.loads(line)
        _Client.child_cpu_seconds += ended["cpu"]
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if timed_out.is_set():  # as subprocess.run(timeout=...) does
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, stdout, stderr)
        _Client.forked += 1
        return subprocess.CompletedProcess([sys.executable, *argv], ended["returncode"], stdout, stderr)
    finally:
        _Client.lock.release()


def _serve():  # pragma: no cover - runs in the server process
    """Read one JSON request per line; fork; report {"pid"}, then {"returncode", "cpu", "wall"}. Returns only
    in a forked child, with its request: the caller runs the command at the top level."""
    import gc
    import importlib
    import time

    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0), os.dup2(devnull, 1)  # stray prints of the imports must not reach the reply pipe
    for name in PRELOAD:
        importlib.import_module(name)
    # Objects that live as long as the process go to a generation the collector never walks: a collection
    # (and the interpreter's exit) in a child would otherwise touch every page it shares with the server and
    # copy it (exit measured 1.8 s without, 0.4 s with). The standard pre-fork step (gc.freeze's docs).
    gc.freeze()
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush(), sys.stderr.flush()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            requests.close(), replies.close()
            return request
        replies.write((json.dumps({"pid": pid}) + "\n").encode()), replies.flush()
        _, status, usage = os.wait4(pid, 0)
        replies.write((json.dumps({"returncode": os.waitstatus_to_exitcode(status),
                                   "cpu": usage.ru_utime + usage.ru_stime,
                                   "wall": time.perf_counter() - t0}) + "\n").encode())
        replies.flush()
    return None


def _become(request: dict) -> str:  # pragma: no cover - runs in a forked child
    """Make this forked child look like `python -m <module> ...` started in request's cwd and environment;
    the module's name."""
    for fd, (path, flags) in enumerate([(os.devnull, os.O_RDONLY),
                                        (request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                        (request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)]):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    sys.argv = ["-m", *argv[2:]]  # _run_module_as_main puts the module's file in argv[0], as -m does
    sys.orig_argv = [sys.executable, *argv]
    sys.path[0] = request["cwd"]  # -m puts the working directory first
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    return argv[1]


if __name__ == "__main__":
    _request = _serve()
    if _request is not None:
        import runpy

        runpy._run_module_as_main(_become(_request), alter_argv=True)

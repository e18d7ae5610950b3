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
  the thread pool, PYTHONWARNINGS, PYTHONPATH): a command is forked from a server started in its own
  environment (one server per environment, `_key`: all of it but LLMLAB_*, WANDB_*, read by llmlab and by
  wandb when a run starts, and pytest's PYTEST_*), or runs fresh where none runs and none may start
  (`try_run`'s `start`).
- numpy's global generator is reseeded from the OS in each child (Python's `random` reseeds itself at fork).
- No tensor op runs in the server (an OpenMP pool used before a fork hangs the child).
- Warnings the preloaded imports print (torchao, bitsandbytes) go to the server's stderr once, not to every
  command's: tests that read stderr see less than a user would. The one-line-error tests
  (test_bad_inputs.py) are refusals that end before these imports in a fresh interpreter too.

LLMLAB_TEST_FORKSERVER=0 runs every command as a fresh interpreter (the behaviour before this file).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
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


SERVER_EXITED = "tests/forkserver.py: the server exited; LLMLAB_TEST_FORKSERVER=0 runs without it"


def usable(argv: list[str]) -> bool:
    """A command a server can run: `-m llmlab.*`, and the switch not off."""
    if os.environ.get("LLMLAB_TEST_FORKSERVER", "1") == "0" or len(argv) < 2 or argv[0] != "-m":
        return False
    return argv[1] == "llmlab" or argv[1].startswith("llmlab.")


def _key(env: dict[str, str]) -> tuple:
    """What a server's imports could have read: its environment without LATE_READ_PREFIXES."""
    return tuple(sorted((k, v) for k, v in env.items() if not k.startswith(LATE_READ_PREFIXES)))


class _Server:
    """A server process started in `env` (so its imports read what a fresh interpreter in that environment would),
    serving one command at a time."""

    def __init__(self, env: dict[str, str]):
        self.lock = threading.Lock()
        self.children_cpu = 0.0
        self.outputs = Path(tempfile.mkdtemp(prefix="llmlab-forkserver-"))  # a command's stdout and stderr
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=str(Path(__file__).parent), env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.stdin.close()  # the server reads to the end of its input, then exits
        self.proc.wait()
        shutil.rmtree(self.outputs, ignore_errors=True)
        # this process's RUSAGE_CHILDREN now holds the server's CPU, its children's included: counted once
        _stats["cpu"] -= self.children_cpu

    def run(self, argv: list[str], env: dict[str, str], cwd: Path, timeout: float,
            new_session: bool) -> subprocess.CompletedProcess:
        out, err = self.outputs / "stdout", self.outputs / "stderr"
        request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                   "new_session": new_session}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        child = json.loads(self.proc.stdout.readline() or '{"pid": null}')["pid"]
        if child is None:
            raise RuntimeError(SERVER_EXITED)
        timed_out = threading.Event()

        def kill():  # as subprocess.run(timeout=...) does; a new session's whole group (its ranks) with it
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGKILL) if new_session else os.kill(child, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:  # the server died with its child: the child's status is lost
            raise RuntimeError(SERVER_EXITED)
        ended = json.loads(line)
        _stats["cpu"] += ended["cpu"]
        self.children_cpu += ended["cpu"]
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if timed_out.is_set():
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, stdout, stderr)
        _stats["forked"] += 1
        return subprocess.CompletedProcess([sys.executable, *argv], ended["returncode"], stdout, stderr)


# Servers of this process by _key, least recently used first. Commands mostly come in this process's own
# environment (which drifts as tests run code in-process: Lightning's seed_everything sets PL_GLOBAL_SEED,
# torch._inductor TORCHINDUCTOR_CACHE_DIR) or in support_matrix.clean_env's; a command in a third environment
# replaces the least recently used idle server (~0.5 GB each, shared pages aside).
MAX_SERVERS = 2
_servers: dict[tuple, _Server] = {}
_servers_lock = threading.Lock()
_stats = {"cpu": 0.0, "forked": 0, "started": 0}


def child_cpu_seconds() -> float:
    """The forked commands' CPU seconds so far (their server, not this process, waits for them)."""
    return _stats["cpu"]


def forked_commands() -> int:
    return _stats["forked"]


def servers_started() -> int:
    return _stats["started"]


def same_imports(env: dict[str, str], other: dict[str, str]) -> bool:
    """Whether a server started in `other` can run a command in `env`."""
    return _key(env) == _key(other)


def try_run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float, new_session: bool = False,
            start: bool = True) -> subprocess.CompletedProcess | None:
    """Run `python *argv` (from `cwd`, in `env`; in a new session if `new_session`, as Popen's
    start_new_session) as a fork of a server started in that environment; None where it cannot (`usable`), when
    that server is busy (a test's thread pool) and no other may start, or when none runs for that environment
    and `start` is false: then run it fresh. (Starting a server costs what a fresh interpreter's imports do, and
    a refusal in a fresh interpreter often ends before them: conftest starts servers only for this process's
    own environment, not for a test's one-off variables.)"""
    if not usable(argv):
        return None
    key = _key(env)
    with _servers_lock:
        server = _servers.pop(key, None)
        if server is not None and not server.alive():
            server = None
        if server is None and not start:
            return None
        if server is None:
            if len(_servers) >= MAX_SERVERS:  # the least recently used idle one makes room
                idle = next((k for k, s in _servers.items() if not s.lock.locked()), None)
                if idle is None:
                    return None
                _servers.pop(idle).stop()
            server = _Server(env)
            _stats["started"] += 1
        _servers[key] = server  # now the most recently used
        if not server.lock.acquire(blocking=False):
            return None
    try:
        return server.run(argv, env, cwd, timeout, new_session)
    finally:
        server.lock.release()


def _serve():  # pragma: no cover - runs in the server process
    """Read one JSON request per line; fork; report {"pid"}, then {"returncode", "cpu"}. Returns only
    in a forked child, with its request: the caller runs the command at the top level."""
    import gc
    import importlib

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
        pid = os.fork()
        if pid == 0:
            requests.close(), replies.close()
            return request
        replies.write((json.dumps({"pid": pid}) + "\n").encode()), replies.flush()
        _, status, usage = os.wait4(pid, 0)
        replies.write((json.dumps({"returncode": os.waitstatus_to_exitcode(status),
                                   "cpu": usage.ru_utime + usage.ru_stime}) + "\n").encode())
        replies.flush()
    return None


def _become(request: dict) -> str:  # pragma: no cover - runs in a forked child
    """Make this forked child look like `python -m <module> ...` started in request's cwd and environment;
    the module's name."""
    if request["new_session"]:
        os.setsid()
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

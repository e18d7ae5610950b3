"""Direct, fast tests of modules that the other tests reach only through whole CLI runs (or not at all):
llmlab/checkpointing/atomic.py, llmlab/loggers.py, llmlab/data/templates.py, and the callbacks
checkpoint, stop, progress, faults, preemption, nonfinite and generation (llmlab/callbacks/). No model
is trained here beyond a few steps of a linear layer; trainers and batches are stand-ins where the
callback only reads a few fields of them.
"""
from __future__ import annotations

import csv
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmlab.errors import ConfigError, DataError


def _replace(monkeypatch, owner, name: str, value, *users) -> None:
    """Replace `owner.name`, and the copy any of `users` bound by `from owner import name` (whether the
    import sits at the top of the user module or inside the function calling it)."""
    monkeypatch.setattr(owner, name, value)
    for user in users:
        if hasattr(user, name):
            monkeypatch.setattr(user, name, value)


# ------------------------------------------------------------------------------------------------
# checkpointing/atomic.py
# ------------------------------------------------------------------------------------------------


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_atomic_write_text_replaces_whole_and_a_reader_never_sees_a_partial_file(tmp_path, monkeypatch):
    from llmlab.checkpointing import atomic

    path = tmp_path / "summary.json"
    path.write_text("old")
    seen_during_write = []
    real_fsync = os.fsync

    def fsync(fd):  # first call: the new content is written, not yet renamed (then the directory's)
        seen_during_write.append((path.read_text(), _siblings(path)))
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic.atomic_write_text(path, "new " * 1000)
    content, others = seen_during_write[0]
    assert content == "old" and len(others) == 1 and others[0].startswith("summary.json.partial")
    assert path.read_text() == "new " * 1000
    assert _siblings(path) == []  # no temporary file left behind


def test_atomic_write_text_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    from llmlab.checkpointing import atomic

    path = tmp_path / "summary.json"
    path.write_text("old")

    def killed(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", killed)  # dies after writing, before the rename
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_text(path, "new")
    assert path.read_text() == "old"


def test_atomic_write_text_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    from llmlab.checkpointing import atomic

    path = tmp_path / "summary.json"
    path.write_text("old")
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic.atomic_write_text(path, "new")
    assert _siblings(path) == []


def test_atomic_dir_replaces_on_success_and_keeps_the_old_on_error(tmp_path):
    from llmlab.checkpointing.atomic import atomic_dir

    target = tmp_path / "hf"
    target.mkdir()
    (target / "model.bin").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            assert tmp.name == "hf.partial" and tmp.is_dir()
            (tmp / "model.bin").write_text("half")
            raise RuntimeError("killed mid-export")
    assert (target / "model.bin").read_text() == "v1" and sorted(os.listdir(tmp_path)) == ["hf"]
    with atomic_dir(target) as tmp:
        (tmp / "model.bin").write_text("v2")
        (tmp / "config.json").write_text("{}")
    assert sorted(os.listdir(target)) == ["config.json", "model.bin"] and (target / "model.bin").read_text() == "v2"
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no .partial, .old or .deleting left


def test_replace_path_crash_between_renames_leaves_two_whole_copies(tmp_path, monkeypatch):
    """The documented worst case for a directory: `<name>` absent, `<name>.old` and the new one both whole."""
    from llmlab.checkpointing import atomic

    old, new = tmp_path / "ckpt", tmp_path / "ckpt.partial"
    for d, v in ((old, "old"), (new, "new")):
        d.mkdir()
        (d / "shard").write_text(v)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two renames
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_path(new, old)
    assert calls == [("ckpt", "ckpt.old"), ("ckpt.partial", "ckpt")]
    assert not old.exists()
    assert (tmp_path / "ckpt.old" / "shard").read_text() == "old" and (new / "shard").read_text() == "new"


def test_remove_deletes_trees_files_and_links_but_not_what_a_link_points_to(tmp_path):
    from llmlab.checkpointing.atomic import remove, sibling

    assert sibling(tmp_path / "a.ckpt", ".prev") == tmp_path / "a.ckpt.prev"
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("x")
    kept = tmp_path / "kept.txt"
    kept.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(kept)
    for p in (tree, link, tmp_path / "missing"):
        remove(p)
    assert sorted(os.listdir(tmp_path)) == ["kept.txt"] and kept.read_text() == "keep"


# ------------------------------------------------------------------------------------------------
# loggers.py
# ------------------------------------------------------------------------------------------------


def test_resumable_csv_logger_appends_where_lightnings_starts_over(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from llmlab.loggers import ResumableCSVLogger

    def log_run(cls, root, steps, key="train/loss"):
        logger = cls(save_dir=str(root), name="", version="")
        for step in steps:
            logger.log_metrics({key: float(step)}, step=step)
        logger.finalize("success")
        return Path(logger.log_dir) / "metrics.csv"

    def rows(path):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    log_run(ResumableCSVLogger, tmp_path / "ours", [0, 1, 2])
    metrics = log_run(ResumableCSVLogger, tmp_path / "ours", [2, 3])  # resumed after step 2's checkpoint
    assert [r["step"] for r in rows(metrics)] == ["0", "1", "2", "2", "3"]  # step 2 trained twice
    assert metrics.read_text().count("train/loss") == 1  # one header, continued
    log_run(CSVLogger, tmp_path / "theirs", [0, 1, 2])
    theirs = log_run(CSVLogger, tmp_path / "theirs", [2, 3])
    assert [r["step"] for r in rows(theirs)] == ["2", "3"]  # why llmlab has its own


# ------------------------------------------------------------------------------------------------
# data/templates.py
# ------------------------------------------------------------------------------------------------


class _ChatTokenizer:
    chat_template = "{% for m in messages %}...{% endfor %}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, tools=None):
        assert tokenize is False and add_generation_prompt is True and tools is None
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_prompt_renderer_detects_each_record_format():
    from llmlab.data.templates import PromptRenderer

    r = PromptRenderer(None, prompt_template="Q: {prompt}\nA: ")
    assert r.detect({"prompt": "p", "response": "r"}) == "prompt_response"
    assert (r.prompt({"prompt": "2+2?", "response": "4"}), r.response({"prompt": "2+2?", "response": "4"})) \
        == ("Q: 2+2?\nA: ", "4")
    alpaca = {"instruction": "Add", "input": "2 and 2", "output": "4"}
    assert r.detect(alpaca) == "alpaca"
    assert r.prompt(alpaca) == "Q: Add\n\n2 and 2\nA: " and r.response(alpaca) == "4"
    assert r.prompt({"instruction": "Add", "input": "", "output": "4"}) == "Q: Add\nA: "  # empty input: no gap
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert r.detect(chat) == "chat"
    assert r.prompt(chat) == "Q: user: hi\nA: " and r.response(chat) == "hello"  # no chat template: flattened
    with_template = PromptRenderer(_ChatTokenizer())
    assert with_template.prompt(chat) == "<user>hi<assistant>" and with_template.response(chat) == "hello"
    forced = PromptRenderer(None, record_format="prompt_response", prompt_field="question", response_field="answer")
    assert forced.detect(alpaca | {"question": "q", "answer": "a"}) == "prompt_response"
    assert forced.prompt({"question": "q", "answer": "a"}) == "q" and forced.response({"question": "q", "answer": "a"}) == "a"


def test_prompt_renderer_errors_name_the_setting():
    from llmlab.data.templates import PromptRenderer

    with pytest.raises(DataError, match=r"data.prompt_template=.*no \{prompt\} placeholder"):
        PromptRenderer(None, prompt_template="Question:")
    with pytest.raises(DataError, match="data.record_format='sharegpt': use auto, prompt_response, alpaca or chat"):
        PromptRenderer(None, record_format="sharegpt")
    r = PromptRenderer(None)
    with pytest.raises(DataError, match=r"data.response_field='response' is not in the records \(fields: \['output', 'prompt'\]\)"):
        r.response({"prompt": "p", "output": "o"})
    with pytest.raises(DataError, match="data.prompt_field='prompt'"):
        r.prompt({"prompt": None, "response": "r"})
    with pytest.raises(DataError, match="must end with an assistant message"):
        r.prompt({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(DataError, match=r"a conversation must be a non-empty list of \{role, content\} messages"):
        r.response({"messages": []})


# ------------------------------------------------------------------------------------------------
# callbacks/stop.py, callbacks/checkpoint.py (a few steps of a linear layer)
# ------------------------------------------------------------------------------------------------


def test_stop_at_step_saves_once_and_stops(tmp_path, monkeypatch):
    from llmlab.callbacks import stop
    from llmlab.checkpointing import checkpoints

    saved = []
    _replace(monkeypatch, checkpoints, "save_checkpoint_atomic", lambda trainer, path: saved.append(Path(path)), stop)
    cb, trainer = stop.StopAtStep(step="3", dirpath=str(tmp_path)), SimpleNamespace(global_step=2, should_stop=False)
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert saved == [] and not trainer.should_stop
    trainer.global_step = 3
    cb.on_train_batch_end(trainer, None, None, None, 0)
    cb.on_train_batch_end(trainer, None, None, None, 1)  # already stopping: no second save
    assert saved == [tmp_path / "last.ckpt"] and trainer.should_stop


class _Linear:
    """A LightningModule over a linear layer, built lazily (lightning imported inside the tests)."""

    @staticmethod
    def build():
        import lightning as L

        class Linear(L.LightningModule):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.model = torch.nn.Linear(4, 1)

            def training_step(self, batch, batch_idx):
                return self.model(batch).pow(2).mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Linear()


def _fit(tmp_path, callbacks, steps=4):
    import lightning as L
    from torch.utils.data import DataLoader

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=str(tmp_path))
    trainer.fit(_Linear.build(), DataLoader(torch.randn(64, 4), batch_size=4))
    return trainer


def test_atomic_checkpoint_writes_whole_checkpoints_with_the_run_snapshot(tmp_path):
    from omegaconf import OmegaConf

    from llmlab.callbacks.checkpoint import AtomicCheckpoint
    from llmlab.checkpointing.resume import RESUME_KEY

    config = tmp_path / "config_resolved.yaml"
    config.write_text(OmegaConf.to_yaml({"model": {"name": "tiny"}, "stage": {"name": "sft"},
                                         "trainer": {"devices": 1, "accumulate_grad_batches": 2}}))
    ckpts = tmp_path / "checkpoints"
    cb = AtomicCheckpoint(dirpath=str(ckpts), filename="{step}", every_n_train_steps=2, save_top_k=-1,
                          save_last=True, config_file=str(config))
    _fit(tmp_path, [cb], steps=4)
    # each save whole under its name, the previous last.ckpt kept as .prev, no .partial left
    assert sorted(os.listdir(ckpts)) == ["last.ckpt", "last.ckpt.prev", "step=2.ckpt", "step=4.ckpt"]
    state = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4
    snapshot = state[RESUME_KEY]  # what a resume compares against the new run's config
    assert snapshot["world_size"] == 1 and snapshot["model.name"] == "tiny" and snapshot["stage.name"] == "sft"
    assert snapshot["trainer.accumulate_grad_batches"] == 2


# ------------------------------------------------------------------------------------------------
# callbacks/progress.py
# ------------------------------------------------------------------------------------------------


def test_step_progress_bar_logs_a_line_every_tenth_with_loss_and_tokens(caplog):
    from llmlab.callbacks import progress

    assert [progress._clock(s) for s in (float("nan"), 0, 59.9, 61, 3600)] == ["?", "0:00", "0:59", "1:01", "60:00"]
    bar = progress.StepProgressBar()
    trainer = SimpleNamespace(is_global_zero=True, max_steps=20, global_step=0, world_size=2,
                              callback_metrics={"train/loss": torch.tensor(1.23456)})
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.tensor([[1] * 8, [1] * 4 + [0] * 4])}
    with caplog.at_level(logging.INFO, logger="llmlab"):
        bar.on_train_start(trainer, None)  # not a terminal under pytest: plain lines
        for step in range(1, 21):
            trainer.global_step = step
            bar.on_train_batch_end(trainer, None, None, batch, step)
        bar.on_train_end(trainer, None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{s}/20" for s in range(2, 21, 2)]
    assert all("loss 1.2346" in line and "tok/s" in line for line in lines[1:])
    assert bar._tokens == 19 * 12 * 2  # real tokens (attention mask) x ranks, from the second batch on
    caplog.clear()
    quiet = progress.StepProgressBar()
    quiet.disable()
    with caplog.at_level(logging.INFO, logger="llmlab"):
        quiet.on_train_start(trainer, None)
        quiet.on_train_batch_end(trainer, None, None, batch, 0)
    assert not caplog.records


def test_step_progress_bar_leaves_validation_time_out_of_tokens_per_second(monkeypatch):
    from llmlab.callbacks import progress

    clock = iter([0.0, 10.0, 11.0, 111.0, 112.0])  # train start, batch, val start, val end (100 s), batch
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.StepProgressBar()
    trainer = SimpleNamespace(is_global_zero=True, max_steps=100, global_step=0, world_size=1, callback_metrics={})
    batch = {"input_ids": torch.zeros(1, 5, dtype=torch.long)}
    bar.on_train_start(trainer, None)
    bar.on_train_batch_end(trainer, None, None, batch, 0)
    bar.on_validation_start(trainer, None)
    bar.on_validation_end(trainer, None)
    bar.on_train_batch_end(trainer, None, None, batch, 1)
    assert bar._seconds == pytest.approx(2.0) and bar._tokens == 5


# ------------------------------------------------------------------------------------------------
# callbacks/faults.py, callbacks/nonfinite.py
# ------------------------------------------------------------------------------------------------


def test_inject_nan_poisons_only_training_forwards_of_its_rank_and_steps():
    from llmlab.callbacks.faults import InjectNaN

    def trainer(step, rank=0, training=True):
        return SimpleNamespace(global_step=step - 1, global_rank=rank, training=training)

    cb = InjectNaN(step=3, count=2, rank=1)
    assert [cb.active(trainer(s, rank=1)) for s in range(1, 7)] == [False, False, True, True, False, False]
    assert not cb.active(trainer(3, rank=0)) and not cb.active(trainer(3, rank=1, training=False))
    with torch.no_grad():
        assert not cb.active(trainer(3, rank=1))  # rollouts, reference forwards
    forever = InjectNaN(step=2, count=-1, rank=None)
    assert [forever.active(trainer(s, rank=r)) for s, r in ((1, 0), (2, 0), (50, 3))] == [False, True, True]

    module = SimpleNamespace(model=torch.nn.Linear(2, 2))
    t = trainer(3, rank=1)
    cb.on_train_start(t, module)
    x = torch.ones(1, 2)
    assert torch.isnan(module.model(x)).all()
    t.global_step = 9
    assert torch.isfinite(module.model(x)).all()
    cb.on_train_end(t, module)
    t.global_step = 2
    assert torch.isfinite(module.model(x)).all()  # hook removed


def test_nonfinite_guard_settings_and_outcome():
    from llmlab.callbacks.nonfinite import NonFiniteGuard, deepspeed_skipped
    from llmlab.errors import RunDiverged

    with pytest.raises(ConfigError, match="trainer.max_bad_steps=0: use 1 or more"):
        NonFiniteGuard(max_bad_steps=0)
    guard = NonFiniteGuard(max_bad_steps=2)
    assert guard.outcome() == {"skipped_steps": 0} and guard.error(SimpleNamespace(is_global_zero=True)) is None
    guard.load_state_dict({"skipped_steps": 5})  # resumed: the count travels in the checkpoint
    assert guard.state_dict() == {"skipped_steps": 5}
    guard.diverged_at, guard.streak_start, guard.last_good = 12, 11, "last.ckpt"
    assert guard.summary_values({}) == {"skipped_steps": 5, "status": "diverged", "diverged_at_step": 12,
                                        "bad_streak_start": 11, "last_good_checkpoint": "last.ckpt"}
    err = guard.error(SimpleNamespace(is_global_zero=True))
    assert isinstance(err, RunDiverged) and "diverged at step 12: 2 non-finite updates in a row from step 11" in str(err)
    overflow = SimpleNamespace(strategy=SimpleNamespace(deepspeed_engine=SimpleNamespace(optimizer=SimpleNamespace(overflow=True))))
    assert deepspeed_skipped(overflow) and not deepspeed_skipped(SimpleNamespace(strategy=SimpleNamespace()))


# ------------------------------------------------------------------------------------------------
# callbacks/preemption.py
# ------------------------------------------------------------------------------------------------


def test_slurm_job_id_and_next_hpc_checkpoint(tmp_path, monkeypatch):
    from llmlab.callbacks.preemption import next_hpc_checkpoint, slurm_job_id

    monkeypatch.setenv("SLURM_JOB_ID", "101")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "101"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "100_3"  # the array task, not the array's own id
    assert next_hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_2.ckpt", "hpc_ckpt_10.ckpt", "hpc_ckpt_x.ckpt", "hpc_ckpt_11.ckpt.partial"):
        (tmp_path / name).touch()
    assert next_hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_11.ckpt"


def test_slurm_requeue_checkpoints_at_a_step_boundary_then_requeues(tmp_path, monkeypatch):
    from llmlab.callbacks import preemption
    from llmlab.checkpointing import checkpoints

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    saved, commands = [], []
    _replace(monkeypatch, checkpoints, "save_checkpoint_atomic", lambda trainer, path: saved.append(path), preemption)
    monkeypatch.setattr(preemption.subprocess, "run",
                        lambda cmd, **kw: commands.append(cmd) or SimpleNamespace(returncode=0, stderr=""))
    signum = signal.SIGUSR2  # not SIGUSR1: nothing else in this process listens to it
    previous = signal.signal(signum, signal.SIG_DFL)
    try:
        cb = preemption.SlurmRequeue(tmp_path, signum=signum)
        strategy = SimpleNamespace(reduce_boolean_decision=lambda flag, all: flag, broadcast=lambda obj: obj)
        trainer = SimpleNamespace(global_step=5, is_global_zero=True, strategy=strategy)
        cb.setup(trainer, None, "fit")
        cb.on_train_start(trainer, None)
        os.kill(os.getpid(), signum)  # the handler only sets a flag
        assert cb.signalled and saved == []
        cb.on_train_batch_end(trainer, None, None, None, 0)  # same step (accumulating): not a boundary
        assert saved == []
        trainer.global_step = 6
        cb.on_train_batch_end(trainer, None, None, None, 1)
        trainer.global_step = 7
        cb.on_train_batch_end(trainer, None, None, None, 2)  # requeued once only
        assert saved == [tmp_path / "hpc_ckpt_1.ckpt"] and commands == [["scontrol", "requeue", "42"]]
        cb.teardown(trainer, None, "fit")
        assert signal.getsignal(signum) == signal.SIG_DFL

        def theirs(signum, frame):  # e.g. submitit's: left in charge
            pass

        signal.signal(signum, theirs)
        other = preemption.SlurmRequeue(tmp_path, signum=signum)
        other.setup(trainer, None, "fit")
        assert signal.getsignal(signum) is theirs
    finally:
        signal.signal(signum, previous)


# ------------------------------------------------------------------------------------------------
# callbacks/generation.py
# ------------------------------------------------------------------------------------------------


def test_sample_generation_rank0_generates_and_reports(monkeypatch, caplog):
    from llmlab.callbacks import generation as callback
    from llmlab.callbacks.generation import SampleGeneration
    from llmlab.evaluation import generation

    calls = []

    def generate_text(model, tokenizer, prompts, max_new_tokens, do_sample, **extra):
        calls.append((prompts, max_new_tokens, do_sample, extra))
        return [p.upper() for p in prompts]

    _replace(monkeypatch, generation, "generate_text", generate_text, callback)
    model = torch.nn.Linear(2, 2)
    model.generate = lambda *a, **k: None
    module = SimpleNamespace(model=model, tokenizer=None)
    cb = SampleGeneration(prompts=["a b", "c"], max_new_tokens=5)
    cb.on_train_end(SimpleNamespace(is_global_zero=False), module)  # rank 1 of DDP: nothing
    assert calls == [] and cb.summary_values({}) == {}
    with caplog.at_level(logging.INFO):
        cb.on_train_end(SimpleNamespace(is_global_zero=True), module)
    assert calls == [(["a b", "c"], 5, False, {})]
    assert cb.summary_values({}) == {"samples": [{"prompt": "a b", "generated": "A B"}, {"prompt": "c", "generated": "C"}]}
    assert "sample | 'a b' -> 'A B'" in caplog.text
    classifier = SimpleNamespace(model=torch.nn.Linear(2, 2), tokenizer=None)  # stage=rm: no generate
    SampleGeneration(prompts=["x"]).on_train_end(SimpleNamespace(is_global_zero=True), classifier)
    assert len(calls) == 1

"""Bad input: exit non-zero with one readable message naming the setting, before weights load."""
from __future__ import annotations

import pytest

from tests.conftest import FAST


def _err(run) -> str:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    return run.stderr


def test_unknown_config_option(cli):
    err = _err(cli("model=nonexistent_model"))
    assert "nonexistent_model" in err and "model" in err


def test_missing_data_file(cli):
    err = _err(cli("data=text", "data.block_size=64", "data.train_files=/no/such/file.jsonl"))
    assert "data.train_files" in err and "/no/such/file.jsonl" in err


def test_empty_dataset(cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    err = _err(cli("data=text", "data.block_size=64", f"data.train_files={empty}", *FAST[:3]))
    assert "data" in err and ("empty" in err or "no complete block" in err)


def test_missing_text_field(cli, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"content": "hello world"}\n' * 50)
    err = _err(cli("data=text", "data.block_size=64", f"data.train_files={f}"))
    assert "data.text_field='text'" in err and "content" in err


def test_block_size_beyond_model_positions(cli):
    err = _err(cli("data.block_size=4096"))
    assert "data.block_size=4096" in err and "256" in err


def test_fp16_on_cpu(cli):
    err = _err(cli("precision=16-mixed"))
    assert "precision=16-mixed" in err and "bf16" in err


def test_missing_local_model_dir(cli):
    err = _err(cli("model.init=pretrained", "model.pretrained=/no/such/model"))
    assert "model.pretrained=/no/such/model" in err


def test_gpu_asked_on_a_cpu_machine(cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = _err(cli("trainer.accelerator=gpu"))
    assert "trainer.accelerator=gpu" in err and "trainer.accelerator=cpu" in err

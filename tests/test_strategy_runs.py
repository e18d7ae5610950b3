"""Strategies: real 2-process DDP / DeepSpeed ZeRO 1-3 runs on CPU (the distributed tier; the config nodes
and rules, which spawn nothing, are in tests/test_strategy_rules.py).

The distributed tests run this file as a script, started in one of two ways that users have too:
`python tests/test_strategy_runs.py --strategy ...` (Lightning's launcher re-runs the command for rank 1, as
for `python -m llmlab.run`), or `torchrun --nproc-per-node 2 ...` (Lightning reads the torchrun env vars;
both ranks import in parallel, so it is faster here). The same code serves both, unchanged.
Each rank writes what it saw to `<out>/rank<r>.json` (and rank 0 the adapter files); the tests compare.
Model: GPT-2 with 2 layers, 32 wide, vocabulary 256, no dropout, fp32, seed 0; data: fixed random
tokens, split by a DistributedSampler without shuffling, so every strategy sees the same batches.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_strategy_rules import SEQ, VOCAB, strategy_node, tiny_gpt2

REPO = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 240  # a ZeRO-3 hang fails the test instead of blocking CI


# ------------------------------------------------------------------------------------------------
# Worker (runs in the launched processes)
# ------------------------------------------------------------------------------------------------


def _worker(argv: list[str]) -> None:
    import argparse

    import lightning as L
    import torch
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from llmlab.distributed import zero3
    from llmlab.evaluation import generation

    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="train", choices=["train", "lora", "hf"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rollout", action="store_true", help="generate inside training_step (PPO-like)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)

    world = args.devices
    n_samples = args.batch * world * args.steps
    tokens = torch.randint(2, 18, (n_samples, SEQ), generator=torch.Generator().manual_seed(1234))  # (N, T)

    class TinyLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.losses: list[float] = []
            self.record: dict = {}
            if args.mode != "hf":  # small: build outside zero.Init (in __init__), as DDP does
                torch.manual_seed(0)
                self.model = tiny_gpt2()
            if args.mode == "lora":
                from peft import LoraConfig, get_peft_model

                lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
                self.model = get_peft_model(self.model, lora)
                self.init_adapter = {
                    k: p.detach().clone() for k, p in self.model.named_parameters() if p.requires_grad
                }

        def configure_model(self) -> None:
            if args.mode != "hf" or hasattr(self, "model"):
                return
            # Built under Lightning's zero.Init: once with HF's DeepSpeed integration, once without.
            torch.manual_seed(0)
            with zero3.hf_deepspeed_context(self.trainer.strategy) as hf_config:
                self.record["hf_config_active"] = hf_config is not None
                self.model = tiny_gpt2()
            self.plain = tiny_gpt2()
            self.plain.requires_grad_(False)

        def _generate_all_ways(self, prompt):
            """Greedy generation gathered, synced, and by a plain copy; ranks ask for different lengths,
            which hangs ZeRO-3 without `generation_context`."""
            rank = self.global_rank
            # eos_token_id=None: exactly max_new tokens, so the ranks' lengths differ for sure
            kwargs = dict(max_new_tokens=3 + 5 * rank, do_sample=False, pad_token_id=1, eos_token_id=None)
            with torch.no_grad():
                with generation.generation_context(self.model, self.trainer.strategy) as extra:
                    gathered = self.model.generate(prompt, **kwargs, **extra)
                with generation.generation_context(self.model, self.trainer.strategy, gather=False) as extra:
                    self.record["synced_kwargs"] = extra
                    synced = self.model.generate(prompt, **kwargs, **extra)
                reference = tiny_gpt2()
                reference.load_state_dict(zero3.gathered_state_dict(self.model, rank0_only=False))
                reference.eval()
                expected = reference.generate(prompt, **kwargs)
            return {"gathered": gathered.tolist(), "synced": synced.tolist(), "reference": expected.tolist()}

        def training_step(self, batch, batch_idx):
            (input_ids,) = batch  # (B, T)
            if args.rollout and batch_idx == 1:
                self.record["rollout"] = self._generate_all_ways(input_ids[:1, :4])
            loss = self.model(input_ids=input_ids, labels=input_ids).loss
            self.losses.append(loss.item())
            if args.mode == "hf" and batch_idx == 0:
                with torch.no_grad():
                    self.record["plain_first_loss"] = self.plain(input_ids=input_ids, labels=input_ids).loss.item()
            return loss

        def validation_step(self, batch, batch_idx):
            self.record["generate"] = self._generate_all_ways(batch[0][:1, :4])  # (1, 4) prompt

        def on_train_end(self) -> None:
            if args.mode != "lora":
                return
            from peft import get_peft_model_state_dict

            gathered = zero3.gathered_state_dict(self.model, trainable_only=True)
            naive = get_peft_model_state_dict(self.model)  # what a plain save would write
            self.record["naive_adapter_numel"] = sum(t.numel() for t in naive.values())
            self.record["adapter_numel"] = sum(t.numel() for t in self.init_adapter.values())
            zero3.save_pretrained_gathered(self.model, str(out / "adapter"))
            if self.global_rank == 0:
                torch.save({"gathered": gathered, "init": self.init_adapter}, out / "adapter_tensors.pt")

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

        def _loader(self, data):
            sampler = DistributedSampler(
                TensorDataset(data), num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
            )
            return DataLoader(TensorDataset(data), batch_size=args.batch, sampler=sampler)

        def train_dataloader(self):
            return self._loader(tokens)

        def val_dataloader(self):
            return self._loader(tokens[: world])

    strategy = instantiate(strategy_node(args.strategy))
    if args.strategy.startswith("zero"):
        from llmlab.distributed.strategies import fill_auto_sizes

        fill_auto_sizes(strategy, hidden=32)  # what train.build_strategy does from an HF model's config
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        limit_val_batches=1 if args.mode == "hf" else 0, default_root_dir=str(out),
    )
    module = TinyLM()
    t0 = time.time()
    trainer.fit(module)
    record = {
        "losses": module.losses,
        "world_size": trainer.world_size,
        "strategy_class": type(trainer.strategy).__name__,
        "root_device": str(trainer.strategy.root_device),
        "process_group_backend": getattr(trainer.strategy, "_process_group_backend", None),
        "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
        "fit_seconds": time.time() - t0,
        **module.record,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    from llmlab.train import close_process_group

    close_process_group()  # every rank exits 0 (no gloo threads left at interpreter shutdown)



# ------------------------------------------------------------------------------------------------
# Launching from pytest
# ------------------------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """No inherited launcher/cluster variables, or Lightning would think Slurm/torchrun started us."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


_RUNS: dict[tuple, dict] = {}


def run_strategy(
    tmp_root: Path,
    strategy: str,
    mode: str = "train",
    devices: int = 2,
    batch: int = 4,
    launcher: str = "lightning",
    rollout: bool = False,
) -> dict:
    """Run the worker once per argument set per session (tests share runs); returns per-rank records."""
    key = (strategy, mode, devices, batch, launcher, rollout)
    if key in _RUNS:
        return _RUNS[key]
    out = tmp_root / "_".join(map(str, key))
    out.mkdir(parents=True, exist_ok=True)
    script = [str(Path(__file__).resolve()), "--strategy", strategy, "--out", str(out),
              "--mode", mode, "--devices", str(devices), "--batch", str(batch)] + (["--rollout"] if rollout else [])
    if launcher == "srun":
        cmd = ["srun", "--nodes=1", f"--ntasks-per-node={devices}", "--cpus-per-task=1", "--job-name=llmlab-test",
               f"--time=00:{WORKER_TIMEOUT_S // 60 + 1:02d}:00", sys.executable, *script]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}", *script]
    else:
        cmd = [sys.executable, *script]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=_clean_env(), cwd=out, capture_output=True, text=True,
                              timeout=WORKER_TIMEOUT_S, start_new_session=True)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{strategy}/{mode} did not finish in {WORKER_TIMEOUT_S}s (hang?)\n{err.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{strategy}/{mode} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    result = {"ranks": ranks, "out": out, "seconds": time.time() - t0}
    _RUNS[key] = result
    return result


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("strategy_runs")


def _assert_close(actual: list[float], expected: list[float], rel: float = 1e-3) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert math.isclose(a, e, rel_tol=rel), f"step {step}: {a} vs {e} (all: {actual} vs {expected})"


# ------------------------------------------------------------------------------------------------
# Distributed tier: 2 CPU processes
# ------------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_ddp_runs_two_processes_on_cpu(runs_dir):
    ranks = run_strategy(runs_dir, "ddp")["ranks"]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [len(r["losses"]) for r in ranks] == [4, 4]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # different shards of the data
    assert all(abs(r["losses"][0] - math.log(VOCAB)) < 0.3 for r in ranks)  # starts near uniform


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("zero", "launcher"),
    [("zero1", "torchrun"), ("zero2", "lightning"), ("zero3", "torchrun"), ("zero3_offload", "torchrun")],
)
def test_zero_losses_equal_ddp(runs_dir, zero, launcher):
    """Invariant: same seed, data and fp32 -> ZeRO's first 4 losses equal DDP's, rank by rank."""
    ddp = run_strategy(runs_dir, "ddp")["ranks"]
    result = run_strategy(runs_dir, zero, launcher=launcher, rollout=zero == "zero3")
    environment = {"lightning": "LightningEnvironment", "torchrun": "TorchElasticEnvironment"}[launcher]
    for rank in range(2):
        assert result["ranks"][rank]["cluster_environment"] == environment
        assert result["ranks"][rank]["root_device"] == f"cpu:{rank}"
        assert result["ranks"][rank]["strategy_class"] == "CPUDeepSpeedStrategy"
        assert result["ranks"][rank]["process_group_backend"] in ("gloo", "ccl")
        _assert_close(result["ranks"][rank]["losses"], ddp[rank]["losses"])


@pytest.mark.distributed
def test_zero3_generation_inside_training_step(runs_dir):
    """PPO-like rollout in training_step under ZeRO-3 (ranks asking for different lengths): no hang,
    same tokens as a plain copy, and training goes on unchanged (the losses above equal DDP's)."""
    ranks = run_strategy(runs_dir, "zero3", launcher="torchrun", rollout=True)["ranks"]
    for rank, record in enumerate(ranks):
        rollout = record["rollout"]
        assert len(rollout["reference"][0]) == 4 + 3 + 5 * rank
        assert rollout["gathered"] == rollout["reference"] and rollout["synced"] == rollout["reference"]
        assert record["synced_kwargs"] == {"synced_gpus": True}


@pytest.mark.distributed
def test_ddp_two_by_four_equals_auto_one_by_eight(runs_dir):
    """Invariant: 2 processes x batch 4 == 1 process x batch 8 (mean of the ranks' losses)."""
    ddp = run_strategy(runs_dir, "ddp")["ranks"]
    single = run_strategy(runs_dir, "auto", devices=1, batch=8)["ranks"][0]
    # one process, batch 8 = samples [0..7]; DistributedSampler gave rank 0 even and rank 1 odd samples
    # of the same 8, and each rank's loss is the mean over its 4 equal-length rows
    mean_of_ranks = [(a + b) / 2 for a, b in zip(ddp[0]["losses"], ddp[1]["losses"])]
    _assert_close(single["losses"], mean_of_ranks)


@pytest.mark.distributed
def test_lora_adapter_saved_under_zero3_holds_the_trained_weights(runs_dir):
    import torch
    from safetensors.torch import load_file

    result = run_strategy(runs_dir, "zero3", mode="lora", launcher="torchrun")
    rank0 = result["ranks"][0]
    # the bug this guards against: under ZeRO-3 the in-memory adapter tensors are empty shards
    assert rank0["naive_adapter_numel"] < rank0["adapter_numel"]
    tensors = torch.load(result["out"] / "adapter_tensors.pt")
    gathered, init = tensors["gathered"], tensors["init"]
    saved = load_file(result["out"] / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in gathered.values()) == rank0["adapter_numel"] > 0
    assert {k.replace(".default.", ".") for k in gathered} == set(saved)
    for key, value in gathered.items():
        on_disk = saved[key.replace(".default.", ".")]
        assert on_disk.shape == init[key].shape and on_disk.numel() > 0
        assert torch.equal(on_disk, value), key
        assert not torch.allclose(on_disk, init[key]), f"{key} did not train"
    assert rank0["losses"][-1] < rank0["losses"][0]


@pytest.mark.distributed
def test_zero3_hf_build_and_generation(runs_dir):
    """Model built by HF inside configure_model under ZeRO-3; validation generation with ranks asking
    for different lengths, both gathered and synced, equals a plain copy's greedy output."""
    ranks = run_strategy(runs_dir, "zero3", mode="hf", launcher="torchrun")["ranks"]
    for rank, record in enumerate(ranks):
        assert record["hf_config_active"]
        # with HF's DeepSpeed integration the weights start as HF initialises them (loss ~ ln 256)...
        assert abs(record["losses"][0] - math.log(VOCAB)) < 0.3, record["losses"]
        # ...without it, zero.Init leaves torch's default init (embedding N(0, 1)): far worse
        assert record["plain_first_loss"] > record["losses"][0] + 3, record
        gen = record["generate"]
        assert len(gen["reference"][0]) == 4 + 3 + 5 * rank
        assert gen["gathered"] == gen["reference"] and gen["synced"] == gen["reference"]
        assert record["synced_kwargs"] == {"synced_gpus": True}



def _slurm_up() -> bool:
    import shutil

    if shutil.which("srun") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slurm
@pytest.mark.distributed
def test_zero2_under_srun_uses_slurm_environment(runs_dir):
    """`srun --ntasks-per-node=2 python ...`: Lightning's SLURMEnvironment, no code change; same losses."""
    if not _slurm_up():
        pytest.skip("no Slurm cluster here (scripts/slurm_local.sh starts one)")
    ddp = run_strategy(runs_dir, "ddp")["ranks"]
    result = run_strategy(runs_dir, "zero2", launcher="srun")
    for rank in range(2):
        assert result["ranks"][rank]["cluster_environment"] == "SLURMEnvironment"
        _assert_close(result["ranks"][rank]["losses"], ddp[rank]["losses"])


if __name__ == "__main__":
    _worker(sys.argv[1:])

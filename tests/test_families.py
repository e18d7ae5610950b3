"""Real model families: PEFT defaults without module names, QLoRA on a Llama, `model=hf`, and sft + LoRA through
the CLI on tiny random llama and qwen3_moe dirs (tests/families.py), dpo on llama and grpo on qwen3_moe. The slow
tier runs every family through sft x (full, lora, qlora) (`test_family_matrix`), dpo (lora), grpo (full), rm (full,
lora) (`test_family_stage_matrix`), the hf/ export's logits (`test_family_export_logits`) and generate + eval
(`test_generate_and_eval_on_every_family`); docs/support-matrix.md's family table is built from the tables here.
"""
from __future__ import annotations

import pytest
import torch

from llmlab.errors import ConfigError
from tests.conftest import assert_ok
from tests.families import FAMILIES


def meta_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.families import _ARCH

    overrides, _ = FAMILIES[model_type]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=512, pad_token_id=0,
                                                                     **{**_ARCH, **overrides}))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_lora_needs_no_module_names_on_any_family(model_type):
    """peft=lora with target_modules=null fits every family: PEFT's table where it has the family (q_proj,v_proj;
    gpt_neox query_key_value), all-linear where it has none (phi3's fused qkv_proj, qwen3_moe)."""
    from omegaconf import OmegaConf

    from llmlab.checks.model import check_peft_targets
    from llmlab.models.peft import apply_peft, target_modules

    cfg = OmegaConf.create({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.05, "bias": "none",
                            "target_modules": None, "modules_to_save": None})
    expected = {"gpt_neox": ["query_key_value"], "phi3": "all-linear", "qwen3_moe": "all-linear"}
    assert target_modules(cfg, model_type) == expected.get(model_type, ["q_proj", "v_proj"])
    model = meta_model(model_type)
    check_peft_targets(cfg, model, model_type)
    wrapped = apply_peft(model, cfg)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in wrapped.named_parameters() if "lora_A" in n}
    # all-linear fallback: every Linear but the head (phi3: fused qkv and gate_up; qwen3_moe: attention, not the
    # fused experts nor the router, which PEFT's own all-linear wraps and then refuses with dropout > 0)
    assert adapted == {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
                       "qwen3_moe": {"q_proj", "k_proj", "v_proj", "o_proj"}}.get(model_type, set(
                           expected.get(model_type, ["q_proj", "v_proj"]))), adapted


def test_ia3_on_a_family_peft_does_not_know_lists_its_layers():
    from omegaconf import OmegaConf

    from llmlab.checks.model import check_peft_targets

    cfg = OmegaConf.create({"method": "ia3", "target_modules": None, "feedforward_modules": None})
    check_peft_targets(cfg, meta_model("qwen2"), "qwen2")  # PEFT's table
    with pytest.raises(ConfigError) as err:
        check_peft_targets(cfg, meta_model("phi3"), "phi3")
    message = str(err.value)
    assert "\n" not in message and "'phi3'" in message and "qkv_proj" in message and "gate_up_proj" in message


def compose(*overrides: str, tmp_path="/tmp/llmlab-test"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import llmlab.run  # noqa: F401  registers the config resolvers
    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_qlora_on_llama_trains_with_packed_masks(family_dir, precision):
    """Issue 21: QLoRA on a local Llama failed inside SDPA: the 4D block-diagonal mask was built in the embedding's
    dtype (bf16, the compute dtype QLoRA holds frozen embeddings in) while fp32 norms made the queries fp32; then
    the bf16 head met fp32 hidden states. Packed rows (segment ids) with a padded row, a forward and backward."""
    pytest.importorskip("bitsandbytes")
    import contextlib

    from llmlab.data.rows import pack_examples, pad_rows
    from llmlab.losses import IGNORE_INDEX
    from llmlab.models.build import build_tokenizer
    from llmlab.stages.build import build_stage
    from llmlab.stages.common import forward_logits, mask_dtype

    cfg = compose("stage=sft", "model=hf", f"model.pretrained={family_dir('llama')}", "peft=qlora",
                  f"precision='{precision}'")
    tok = build_tokenizer(cfg.model)
    model = build_stage(cfg, tok).model
    assert mask_dtype(model) == torch.bool  # sdpa: a boolean mask fits queries of any dtype
    ids = [tok("hear me speak")["input_ids"], tok("All: Speak, speak. First Citizen")["input_ids"]]
    rows = pack_examples([{"input_ids": i, "labels": i} for i in ids], 64) + [{"input_ids": ids[0], "labels": ids[0]}]
    batch = pad_rows(rows, tok.pad_token_id)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    with autocast:
        logits = forward_logits(model, batch)
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                                 ignore_index=IGNORE_INDEX)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_model_name_follows_the_weights():
    from omegaconf import OmegaConf

    from llmlab.run import model_name_of, name_model_after_weights

    assert model_name_of("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert model_name_of("/models/Llama-3.2-1B/") == "Llama-3.2-1B"
    assert model_name_of("/runs/sft/hf") == "sft/hf"
    cfg = OmegaConf.create({"model": {"name": "tiny-base", "pretrained": "/models/Qwen3-0.6B"}})
    name_model_after_weights(cfg, ["stage=sft", "model.pretrained=/models/Qwen3-0.6B"])
    assert cfg.model.name == "Qwen3-0.6B"
    cfg.model.name = "mine"
    name_model_after_weights(cfg, ["model.pretrained=/models/Qwen3-0.6B", "model.name=mine"])
    assert cfg.model.name == "mine"
    assert compose("model=hf", "model.pretrained=/models/Qwen3-0.6B").model.name == "Qwen3-0.6B"


# ---------------------------------------------------------------------------------------------------
# sft on chat data per family x (full, lora, qlora, dora, lora_int8, ia3): the fast tier runs llama and qwen3_moe with LoRA,
# the slow tier every cell (docs/support-matrix.md "Model families")
# ---------------------------------------------------------------------------------------------------
CELLS = ["none", "lora", "qlora", "dora", "lora_int8", "ia3"]
# (model_type, peft) -> (a regex of the one-line error, before weights load; the reason docs/support-matrix.md gives). IA3: PEFT's
# table has no entry for phi3 and qwen3_moe; its mixtral entry names the experts' `w2` Linear, which transformers 5
# fuses into one expert tensor (no Linear left to scale): the error lists the layers to choose from instead.
REFUSED: dict[tuple[str, str], tuple[str, str]] = {
    ("phi3", "ia3"): ("PEFT has no default peft.target_modules", "PEFT has no IA3 defaults for phi3"),
    ("qwen3_moe", "ia3"): ("PEFT has no default peft.target_modules", "PEFT has no IA3 defaults for qwen3_moe"),
    ("mixtral", "ia3"): (r"\['w2'\] match no linear layer",
                         "PEFT's IA3 defaults name w2, fused into the expert tensor in transformers 5"),
}


# the text of every data file below (chat, pairs, prompts)
LINES = ["hear me speak", "Speak, speak.", "You are all resolved rather to die than to famish?",
         "Resolved. resolved.", "First, you know Caius Marcius is chief enemy to the people."]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with path.open("w") as f:
        for i in range(40):
            msgs = [{"role": "user", "content": LINES[i % 5]}, {"role": "assistant", "content": LINES[(i + 1) % 5]}]
            if i % 2:
                msgs += [{"role": "user", "content": LINES[(i + 2) % 5]}, {"role": "assistant", "content": LINES[(i + 3) % 5]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def train_cell(model_dir, stage: str, peft: str, data_file, tmp_path, steps: int = 2, overrides=(), export=None):
    """`steps` optimizer steps of `stage` model=hf on `data_file`, through a plain Lightning Trainer (the run's own
    checks, tokenizer, datamodule and stage; `export`: a dir the run's `hf/` callback writes at the end):
    (training losses, the weights at the start by name, the trained stage module)."""
    import lightning as L

    from llmlab.callbacks.export import HFExport
    from llmlab.checks import entry as checks
    from llmlab.data.datamodule import LLMDataModule
    from llmlab.models.build import build_tokenizer
    from llmlab.stages.build import build_stage, stage_class

    cfg = compose(f"stage={stage}", "model=hf", f"model.pretrained={model_dir}", f"peft={peft}", "data=text",
                  f"data.train_files={data_file}", "data.batch_size=4", "data.block_size=128", *overrides,
                  tmp_path=tmp_path)
    checks.check_config(cfg)
    tok = build_tokenizer(cfg.model)
    dm = LLMDataModule(cfg.data, stage_class(cfg.stage).data_format, tok, seed=0)
    module = build_stage(cfg, tok)
    losses, start = [], {}

    class Record(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            start.update((n, p.detach().clone()) for n, p in pl_module.model.named_parameters())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # grpo optimizes by hand and returns no loss: its logged mean loss of the rollout
            loss = (outputs or {}).get("loss")
            losses.append(float(loss if loss is not None else trainer.callback_metrics["train/loss"]))

    callbacks = [Record()] + ([HFExport(str(export))] if export is not None else [])
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    return losses, start, module


def sft_cell(model_dir, peft: str, chat_file, tmp_path, steps: int = 2):
    """The training losses of `steps` sft steps on the chat file."""
    return train_cell(model_dir, "sft", peft, chat_file, tmp_path, steps)[0]


def check_cell(family_dir, model_type, peft, chat_file, tmp_path):
    if peft in ("qlora", "lora_int8"):
        pytest.importorskip("bitsandbytes")
    if (model_type, peft) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[model_type, peft][0]):
            sft_cell(family_dir(model_type), peft, chat_file, tmp_path)
        return
    losses = sft_cell(family_dir(model_type), peft, chat_file, tmp_path)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_sft_lora_trains_a_dense_and_a_moe_family(family_dir, model_type, chat_file, tmp_path):
    check_cell(family_dir, model_type, "lora", chat_file, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("peft", CELLS)
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_matrix(family_dir, model_type, peft, chat_file, tmp_path):
    check_cell(family_dir, model_type, peft, chat_file, tmp_path)


@pytest.mark.slow
def test_readme_chat_finetune_of_a_local_dir(family_dir, chat_file, cli):
    """The README's first example: a local chat model fine-tuned with LoRA on chat data in one command; the run
    is named after the directory."""
    run = cli("stage=sft", "model=hf", f"model.pretrained={family_dir('qwen2')}", "peft=lora", "data=text",
              f"data.train_files={chat_file}", "data.block_size=128", "trainer.max_steps=2",
              "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false")
    assert_ok(run)
    assert run.summary["model"] == "qwen2" and "model=qwen2" in run.stdout + run.stderr


def test_support_matrix_lists_every_family():
    from tests.support_matrix import DOC, family_section

    assert "\n".join(family_section()) in DOC.read_text(), "run: python -m tests.support_matrix --rejudge"


# ---------------------------------------------------------------------------------------------------
# dpo (lora), grpo (full) and rm (full, lora: a sequence-classification head) per family; the run's hf/ export
# reloaded by transformers; llmlab.generate and llmlab.eval on each family's dir
# ---------------------------------------------------------------------------------------------------
# (stage, peft): dpo with LoRA (the reference is the adapter-off model: no second copy); grpo fully (64-wide models:
# full fine-tuning costs no more than LoRA and trains every weight); rm fully and with LoRA (PEFT's SEQ_CLS task
# must keep each family's new score head trainable)
STAGE_CELLS = [("dpo", "lora"), ("grpo", "none"), ("rm", "none"), ("rm", "lora")]
# (model_type, stage, peft) -> the reason it is refused (ConfigError before weights load); none today
STAGE_REFUSED: dict[tuple[str, str, str], str] = {}


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    """prompt/chosen/rejected string records (dpo, rm)."""
    import json

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": LINES[i % 5], "chosen": LINES[(i + 1) % 5],
                                        "rejected": LINES[(i + 3) % 5][::-1]}) + "\n" for i in range(40)))
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    """prompt records (grpo)."""
    import json

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": LINES[i % 5]}) + "\n" for i in range(40)))
    return path


# grpo: 2 rollouts of 2 prompts x 4 completions, 6 tokens each; the format reward (1 when a completion holds an
# "e") varies inside a group of a random model's completions, so advantages are not all zero and weights move
GRPO = ("data.batch_size=2", "stage.module.num_generations=4", "stage.module.max_completion_length=6",
        "reward=[format]", "reward.format.pattern=e", "reward.format.search=true", "seed=1")


def stage_cell(family_dir, model_type, stage, peft, pair_file, prompt_file, tmp_path):
    """2 steps of `stage` on the family; asserts what must change did and what must not did not (rm: and that its
    hf/ export, LoRA and score head merged, scores as the trained module under AutoModelForSequenceClassification)."""
    data, extra = (prompt_file, GRPO) if stage == "grpo" else (pair_file, ())
    export = tmp_path / "hf" if stage == "rm" else None
    if (model_type, stage, peft) in STAGE_REFUSED:
        with pytest.raises(ConfigError, match=STAGE_REFUSED[model_type, stage, peft]):
            train_cell(family_dir(model_type), stage, peft, data, tmp_path, overrides=extra)
        return
    losses, start, module = train_cell(family_dir(model_type), stage, peft, data, tmp_path, overrides=extra,
                                       export=export)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    trained = dict(module.model.named_parameters())
    moved = {n for n, p in start.items() if not torch.equal(trained[n], p)}
    if stage == "dpo":
        from transformers import AutoModelForCausalLM

        assert moved and all("lora_" in n for n in moved), sorted(moved)[:5]  # only the adapter trains
        # the reference is the model with its adapter off: its weights are the dir's, bit for bit
        base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in trained.items()}
        assert all(torch.equal(base[n], p) for n, p in AutoModelForCausalLM.from_pretrained(
            family_dir(model_type)).named_parameters()), "the frozen reference moved"
    else:
        assert moved, f"{stage}: no weight changed"
    if stage == "rm":
        assert type(module.model).__name__.endswith("ForSequenceClassification")
        head = {n for n in moved if ".score." in f".{n}"}  # PEFT keeps it as score.modules_to_save.default
        assert head and moved - head, sorted(moved)  # the new head and the body (LoRA: its adapters) trained
        assert peft == "none" or all("lora_" in n for n in moved - head), sorted(moved - head)[:5]
        from transformers import AutoModelForSequenceClassification

        exported = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()
        # a right-padded batch: the score is read at each row's last token (config.pad_token_id must survive)
        enc = module.tokenizer(["hear me speak", "Speak, speak. First Citizen: you know"], padding=True,
                               return_tensors="pt")
        with torch.no_grad():
            want, got = module.model.eval()(**enc).logits, exported(**enc).logits  # (B, 1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type,stage,peft", [("llama", "dpo", "lora"), ("qwen3_moe", "grpo", "none")])
def test_stage_cells_on_a_dense_and_a_moe_family(family_dir, model_type, stage, peft, pair_file, prompt_file,
                                                 tmp_path):
    stage_cell(family_dir, model_type, stage, peft, pair_file, prompt_file, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("stage,peft", STAGE_CELLS)
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_stage_matrix(family_dir, model_type, stage, peft, pair_file, prompt_file, tmp_path):
    stage_cell(family_dir, model_type, stage, peft, pair_file, prompt_file, tmp_path)


def export_cell(family_dir, model_type, peft, chat_file, tmp_path):
    """2 sft steps, then the run's hf/ export (models/export.py; LoRA merged) reloaded by plain transformers gives
    the trained module's logits, and not the starting dir's (an export that dropped the training would)."""
    from transformers import AutoModelForCausalLM

    _, _, module = train_cell(family_dir(model_type), "sft", peft, chat_file, tmp_path, export=tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    start = AutoModelForCausalLM.from_pretrained(family_dir(model_type), dtype=torch.float32).eval()
    ids = torch.randint(0, exported.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = module.model.eval()(input_ids=ids).logits  # (B, T, V)
        got, before = exported(input_ids=ids).logits, start(input_ids=ids).logits
    torch.testing.assert_close(got, trained, atol=1e-5, rtol=0)
    assert (before - trained).abs().max() > 1e-3, "training left the logits where they started"


def test_generation_prompts_get_bos_once():
    """generate_text encodes a plain prompt as training does (data/rows.py): Llama 3's and Gemma's BOS first (it
    was left out, so every plain prompt to those families differed from training and from transformers'
    `generate`); a prompt a chat template rendered, which starts with BOS, gets none added."""
    from llmlab.evaluation.generation import prompt_ids
    from tests.families import family_tokenizer

    for template in ("llama3", "gemma3", "qwen2_5"):
        tok = family_tokenizer(template)
        plain = tok("hear me speak", add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id] if template != "qwen2_5" else []  # Qwen adds none
        assert prompt_ids(tok, "hear me speak") == bos + plain
        rendered = tok.apply_chat_template([{"role": "user", "content": "hear me speak"}], tokenize=False,
                                           add_generation_prompt=True)
        assert prompt_ids(tok, rendered) == tok(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["none", "lora"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_export_logits(family_dir, model_type, peft, chat_file, tmp_path):
    export_cell(family_dir, model_type, peft, chat_file, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_generate_and_eval_on_every_family(family_dir, model_type, tmp_path):
    """`llmlab.generate` (its main, in this process: ten interpreter starts would cost ~1 min) greedy on plain
    prompts == transformers' own greedy `generate` (its tokenizer's BOS included); `llmlab.eval eval=builtin`
    (the CLI's function on the CLI's config) writes eval.json with both tasks' metrics."""
    import json

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab.eval import evaluate_cli
    from llmlab.generate import main as generate
    from tests.conftest import CONF

    model_dir, prompts = family_dir(model_type), ["hear me speak", "Speak, speak. First Citizen:"]
    out = tmp_path / "generated.jsonl"
    assert generate([str(model_dir), *(f"prompt={p}" for p in prompts), "template=none", "max_new_tokens=8",
                     f"out={out}"]) == 0
    generated = [json.loads(line)["generated"] for line in out.read_text().splitlines()]
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        new = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
        expected.append(tok.decode(new, skip_special_tokens=True))
    assert generated == expected

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("eval", overrides=[f"path={model_dir}", "eval=builtin", "limit=4",
                                               f"out={tmp_path / 'eval.json'}"])
    evaluate_cli(cfg)
    tasks = json.loads((tmp_path / "eval.json").read_text())["tasks"]
    assert {t: sorted(v["metrics"]) for t, v in tasks.items()} == {
        "llmlab_builtin_mc": ["acc", "acc_norm"], "llmlab_builtin_em": ["exact_match"]}
    assert all(0.0 <= x <= 1.0 and v["n_samples"] == 4 for v in tasks.values() for x in v["metrics"].values())


@pytest.mark.slow
def test_generate_and_eval_cli_on_a_family_dir(family_dir, tmp_path):
    """The two commands as a user types them, on a Gemma 3 dir (its tokenizer adds BOS): the same answers as
    the in-process check above, and eval.json where out= says."""
    import json

    from llmlab.generate import main as generate
    from tests.conftest import run_module

    model_dir = family_dir("gemma3_text")
    proc = run_module("llmlab.generate", str(model_dir), "prompt=hear me speak", "template=none", "max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = [json.loads(line)["generated"] for line in proc.stdout.splitlines() if line.startswith("{")]
    out = tmp_path / "generated.jsonl"
    assert generate([str(model_dir), "prompt=hear me speak", "template=none", "max_new_tokens=8", f"out={out}"]) == 0
    assert cli == [json.loads(line)["generated"] for line in out.read_text().splitlines()]
    proc = run_module("llmlab.eval", str(model_dir), "eval=builtin", "limit=2", f"out={tmp_path / 'eval.json'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads((tmp_path / "eval.json").read_text())["tasks"]) == {"llmlab_builtin_mc", "llmlab_builtin_em"}

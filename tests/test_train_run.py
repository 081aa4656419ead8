"""`monte-ds train` end to end on a tiny LLaMA (CPU, fp32, seconds per run), and the trainer's
loss arithmetic against a hand-computed objective.

The 2-rank runs (DDP, ZeRO-2, ZeRO-3, FSDP2 on gloo) are in test_distributed.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from monte_ds import load_adapter, monteclora_losses, run_folder
from monte_ds.errors import UserError, run_cli
from monte_ds.monteclora.engine import REGULARISER_TERMS
from monte_ds.train import checkpoints, run
from monte_ds.train.config import load_config, training_arguments
from monte_ds.train.data import dataset_texts, load_training_data, prepare_dataset, split_eval
from monte_ds.train.model import attach_adapter, ensure_tiny_model, load_base_model
from monte_ds.train.run import main
from monte_ds.train.trainer import MonteCLoRATrainer


REPO = Path(__file__).resolve().parents[1]
DATA = "bundled:tiny_instruct.jsonl"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The tiny LLaMA the embedded config builds (tokenizer trained on the bundled data)."""
    path = tmp_path_factory.mktemp("train-base") / "tiny-llama"
    ensure_tiny_model(path, dataset_texts(prepare_dataset(load_training_data(DATA))), seed=0)
    return path


def write_config(directory: Path, base: Path, **sections) -> Path:
    """A small run: 4 steps of 4 examples of <= 64 tokens, r = 4, logged every step."""
    config = {
        "model": {"path": str(base), "dtype": "float32"},
        "adapter": {"r": 4, "lora_alpha": 8},
        "data": {"path": DATA, "max_samples": 64},
        "training": {
            "output_dir": str(directory / "out"),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "max_length": 64,
            "bf16": False,
            "activation_checkpointing": False,
            "optim": "adamw_torch",
            "logging_steps": 1,
            "save_steps": 2,
            "seed": 0,
            "report_to": [],
        },
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def train(config: Path, *flags: str) -> int:
    return run_cli(main, ["--config", str(config), *flags])


def metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def step_logs(output_dir: Path) -> dict[int, dict]:
    return {entry["step"]: entry for entry in metrics(output_dir)["log_history"] if "loss" in entry}


def eval_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# -- one run, everything it leaves ------------------------------------------------------------------
def test_tiny_run_builds_its_base_trains_and_leaves_reloadable_adapters(tmp_path):
    base = tmp_path / "tiny-llama"
    config = write_config(
        tmp_path,
        base,
        model={"build_tiny": True},
        training={"report_to": ["tensorboard"], "save_total_limit": 1},
        eval={"suites": ["arc_easy"], "data_dir": str(REPO / "tests" / "fixtures" / "eval"), "limit": 2},
    )
    assert train(config) == 0
    out = tmp_path / "out"
    assert (base / "config.json").is_file() and (base / "tokenizer.json").is_file()

    result = metrics(out)
    assert result["status"] == "completed" and result["global_step"] == 4
    assert result["train_loss"] > 0
    logs = step_logs(out)
    assert sorted(logs) == [1, 2, 3, 4]
    for entry in logs.values():  # every regulariser term, every logged step
        assert all(entry[name] >= 0 for name in (*REGULARISER_TERMS, "regulariser"))
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard

    # save_total_limit=1 keeps the latest checkpoint, complete, with the sampler counter
    assert [p.name for p in checkpoints.checkpoint_dirs(out)] == ["checkpoint-4"]
    assert checkpoints.is_complete(out / "checkpoint-4")
    assert checkpoints.read_sampler_state(out / "checkpoint-4")["forward_index"] == 4
    assert json.loads((out / "config.json").read_text())["adapter"]["method"] == "monteclora"

    # The MonteCLoRA adapter and the plain peft export are the same model at inference (the mean)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    monte = load_adapter(AutoModelForCausalLM.from_pretrained(base), out / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "lora_adapter")
    base_logits = eval_logits(AutoModelForCausalLM.from_pretrained(base), ids)
    torch.testing.assert_close(eval_logits(monte, ids), eval_logits(plain, ids))
    assert not torch.allclose(eval_logits(plain, ids), base_logits)  # training moved B away from 0

    # The report of the saved adapter, with the run's metadata and training curves
    report = json.loads((out / "report" / "report.json").read_text())
    resolved = load_config(out / "config.json")
    assert report["metadata"]["config_hash"] == resolved.config_hash()
    assert report["metadata"]["adapter_method"] == "monteclora" and report["metadata"]["seed"] == 0
    assert (out / "report" / "training_curves.png").is_file()


def test_lora_baseline_runs_through_the_same_pipeline(tmp_path, tiny_base):
    config = write_config(tmp_path, tiny_base, adapter={"method": "lora"}, training={"max_steps": 2})
    assert train(config) == 0
    out = tmp_path / "out"
    assert metrics(out)["status"] == "completed"
    assert not (out / "adapter").exists()  # no MonteCLoRA adapter for a plain LoRA run
    assert all("kl_gaussian" not in entry for entry in step_logs(out).values())
    assert not (out / "checkpoint-2" / run_folder.CHECKPOINT_SAMPLER_JSON).exists()
    assert checkpoints.is_complete(out / "checkpoint-2")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out / "lora_adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n) > 0

    # Run again without --resume after a finished run: a fresh run, nothing of the old one left
    assert train(config, "--set", "training.max_steps=1") == 0
    assert metrics(out)["global_step"] == 1
    assert [p.name for p in checkpoints.checkpoint_dirs(out)] == ["checkpoint-1"]  # its final save only


def test_qlora_keeps_monteclora_parameters_in_fp32(tmp_path, tiny_base):
    config = write_config(
        tmp_path,
        tiny_base,
        quantization={"mode": "nf4", "double_quant": True, "compute_dtype": "float32"},
        training={"max_steps": 2, "save_strategy": "no"},
    )
    assert train(config) == 0
    out = tmp_path / "out"
    assert metrics(out)["status"] == "completed"
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert saved and all(tensor.dtype == torch.float32 for tensor in saved.values())
    assert any(key.endswith("monteclora_log_params") for key in saved)


def test_evaluation_during_training_scores_the_held_out_rows_with_the_mean_adapter(tmp_path, tiny_base):
    """`eval_strategy: steps` with `data.eval_size`: the last rows are held out of training and
    scored every `eval_steps` (eval mode: the mean, no noise), and the run's steps are exactly those
    of the same run on the remaining rows without evaluation (an evaluation draws nothing)."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "plain").mkdir()
    held_out = {"data": {"path": DATA, "max_samples": 64, "eval_size": 8}}
    evaluating = write_config(
        tmp_path / "eval", tiny_base, **held_out, training={"eval_strategy": "steps", "eval_steps": 2}
    )
    plain = write_config(tmp_path / "plain", tiny_base, data={"path": DATA, "max_samples": 56})
    assert train(evaluating) == 0 and train(plain) == 0
    plan = run.plan_run(["--config", str(evaluating)])
    assert (len(plan.dataset), len(plan.eval_dataset)) == (56, 8)
    log = metrics(tmp_path / "eval" / "out")["log_history"]
    assert sorted(entry["step"] for entry in log if "eval_loss" in entry) == [2, 4]
    assert all(math.isfinite(entry["eval_loss"]) for entry in log if "eval_loss" in entry)
    plain_steps = step_logs(tmp_path / "plain" / "out")
    for step, entry in step_logs(tmp_path / "eval" / "out").items():
        assert entry["loss"] == plain_steps[step]["loss"], step


def test_eval_size_must_leave_rows_to_train_on():
    from datasets import Dataset

    with pytest.raises(UserError, match=r"^data.eval_size: 3 would hold out every row \(the data has 3\)$"):
        split_eval(Dataset.from_dict({"text": ["a", "b", "c"]}), 3)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_activation_checkpointing_recomputes_with_the_same_noise(tmp_path, tiny_base, reentrant):
    """The recomputed forward must see the draw of the first one, or the gradients change."""
    runs = {}
    for name, checkpointing in [
        ("plain", {}),
        (
            "checkpointed",
            {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": reentrant}},
        ),
    ]:
        (tmp_path / name).mkdir()
        config = write_config(
            tmp_path / name, tiny_base, training={"max_steps": 3, "save_strategy": "no", **checkpointing}
        )
        assert train(config) == 0
        runs[name] = step_logs(tmp_path / name / "out")
    for step in (1, 2, 3):
        assert runs["checkpointed"][step]["loss"] == pytest.approx(runs["plain"][step]["loss"], rel=1e-6)
        assert runs["checkpointed"][step]["grad_norm"] == pytest.approx(runs["plain"][step]["grad_norm"], rel=1e-5)


# -- resume -----------------------------------------------------------------------------------------
def test_a_resumed_run_reproduces_the_uninterrupted_one(tmp_path, tiny_base):
    """Interrupted after step 3 (its checkpoint-3) and a save killed halfway (checkpoint-6 without
    its completion marker): --resume goes on from step 3 with exactly the uninterrupted losses.
    Gradient accumulation (two noise draws per step) and LoRA dropout (torch RNG) included."""
    overrides = {
        "max_steps": 6,
        "save_steps": 3,
        "gradient_accumulation_steps": 2,
        "per_device_train_batch_size": 2,
    }
    (tmp_path / "full").mkdir()
    config = write_config(tmp_path / "full", tiny_base, adapter={"lora_dropout": 0.1}, training=overrides)
    assert train(config) == 0
    full = tmp_path / "full" / "out"

    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copytree(full / "checkpoint-6", resumed / "checkpoint-6")
    (resumed / "checkpoint-6" / run_folder.CHECKPOINT_MARKER_JSON).unlink()
    (resumed / "checkpoint-6" / "optimizer.pt").write_bytes(b"\0" * 10)
    assert train(config, "--set", f"training.output_dir={resumed}", "--resume") == 0

    expected, actual = step_logs(full), step_logs(resumed)
    for step in (4, 5, 6):
        assert actual[step]["loss"] == expected[step]["loss"]
        assert actual[step]["grad_norm"] == expected[step]["grad_norm"]
        assert actual[step]["kl_gaussian"] == expected[step]["kl_gaussian"]
    final, again = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (full, resumed))
    assert final.keys() == again.keys()
    assert all(torch.equal(final[key], again[key]) for key in final)
    assert checkpoints.is_complete(resumed / "checkpoint-6")  # the half-written one was replaced


# -- divergence -------------------------------------------------------------------------------------
def test_a_diverging_run_stops_with_exit_3_and_saves_nothing_more(tmp_path, tiny_base):
    config = write_config(
        tmp_path,
        tiny_base,
        training={"learning_rate": 1e3, "max_grad_norm": 0.0, "max_steps": 10, "save_steps": 1},
    )
    assert train(config) == 3
    out = tmp_path / "out"
    result = metrics(out)
    assert result["status"] == "diverged"
    last = max(step_logs(out).items())
    assert last[0] == result["global_step"] < 10 and last[1]["loss"] is None  # NaN is written as null
    assert [p.name for p in checkpoints.checkpoint_dirs(out)] == [f"checkpoint-{result['global_step'] - 1}"]
    assert not (out / "adapter").exists() and not (out / "lora_adapter").exists()


# -- the regulariser's scaling ----------------------------------------------------------------------
@pytest.mark.parametrize("token_normalised", [True, False], ids=["num_items_in_batch", "per_batch_mean"])
def test_regulariser_is_scaled_like_the_task_loss_under_accumulation(tmp_path, tiny_base, token_normalised):
    """The gradient the trainer accumulates over 2 micro-batches equals, to rounding, the gradient
    of the objective written out by hand: token-weighted cross-entropy + the micro-batches' mean
    regulariser (or, without token normalisation, the mean of per-batch CE + regulariser)."""
    config = load_config(
        write_config(
            tmp_path,
            tiny_base,
            data={"max_samples": 4},
            training={
                "max_steps": 1,
                "gradient_accumulation_steps": 2,
                "per_device_train_batch_size": 2,
                "max_grad_norm": 0.0,
                "train_sampling_strategy": "sequential",
                "save_strategy": "no",
            },
        )
    )
    args = training_arguments(config)
    dataset = prepare_dataset(load_training_data(DATA), max_samples=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)

    def build() -> PeftModel:
        return attach_adapter(
            load_base_model(config, torch.device("cpu"), sharded=False), config, args.seed, False, None
        )

    grads: dict[str, torch.Tensor] = {}

    class CaptureGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    trainer = MonteCLoRATrainer(model=build(), args=args, train_dataset=dataset, processing_class=tokenizer)
    if not token_normalised:
        trainer.model_accepts_loss_kwargs = False  # as for a model without loss kwargs: no num_items_in_batch
    trainer.add_callback(CaptureGradients())
    batches = list(trainer.get_train_dataloader())[:2]
    trainer.train()

    reference = build()
    reference.train()
    tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
    objective = torch.zeros(())
    for batch in batches:
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        ce_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        regulariser = monteclora_losses(reference)["total"]
        if token_normalised:
            objective = objective + ce_sum / tokens + regulariser / 2
        else:
            objective = objective + (ce_sum / (labels != -100).sum() + regulariser) / 2
    objective.backward()

    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)
    stacked = [n for n in expected if n.endswith("monteclora_log_params")]
    assert stacked and all(expected[n].abs().sum() > 0 for n in stacked)


def test_checkpoints_rotate_once_complete_and_the_arguments_stay_as_given(tmp_path, tiny_base):
    """The trainer keeps `save_total_limit` complete checkpoints, rotating after the new one is
    marked complete, and leaves the arguments it was given untouched."""
    config = load_config(
        write_config(
            tmp_path,
            tiny_base,
            data={"max_samples": 4},
            training={"max_steps": 3, "save_steps": 1, "save_total_limit": 2, "per_device_train_batch_size": 2},
        )
    )
    args = training_arguments(config)
    model = attach_adapter(load_base_model(config, torch.device("cpu"), sharded=False), config, args.seed, False, None)
    dataset = prepare_dataset(load_training_data(DATA), max_samples=4)
    trainer = MonteCLoRATrainer(
        model=model, args=args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(tiny_base)
    )
    trainer.train()
    assert args.save_total_limit == 2
    out = config.output_dir
    assert [p.name for p in checkpoints.checkpoint_dirs(out)] == ["checkpoint-2", "checkpoint-3"]
    assert all(checkpoints.is_complete(p) for p in checkpoints.checkpoint_dirs(out))

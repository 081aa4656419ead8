"""Every `adapter.method` through `monte-ds train` on a tiny LLaMA: it trains, a resumed run
reproduces the uninterrupted one, and its saved output reloads (the way the evaluation after
training loads it) with the trained model's eval logits. Plus per-method option checks.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from monte_ds import run_folder
from monte_ds.errors import UserError
from monte_ds.train import run
from monte_ds.train.config import load_config, validate_config
from monte_ds.train.methods import ACCEPTED, METHODS, REGISTRY
from monte_ds.train.methods.adalora import ORTHOGONALITY
from monte_ds.train.model import attach_adapter, load_base_model, load_tokenizer
from monte_ds.train.trainer import MonteCLoRATrainer
from tests.test_train_run import DATA, metrics, step_logs, tiny_base, train, write_config  # noqa: F401 (tiny_base: a fixture)


# Small settings that make each method do something visible in 4 steps.
METHOD_SETTINGS = {
    "adalora": {"init_r": 6, "tfinal": 1},  # prune 6 -> 4 over steps 0-2, then the final phase
    "prompt_tuning": {"num_virtual_tokens": 4},
    "loraplus": {"loraplus_lr_ratio": 8},
}


def method_config(directory: Path, base: Path, method: str) -> Path:
    """test_train_run's 4-step run (a checkpoint every 2 steps) for `method`; r = 4 where it has a rank."""
    path = write_config(directory, base, training={"learning_rate": 1e-2})
    config = json.loads(path.read_text())
    shared = {key: value for key, value in config["adapter"].items() if key in ACCEPTED[method]}
    config["adapter"] = {"method": method, **shared, **METHOD_SETTINGS.get(method, {})}
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def trainers(monkeypatch) -> list[MonteCLoRATrainer]:
    """The trainers `monte-ds train` builds, kept for a look at the trained model in memory."""
    built: list[MonteCLoRATrainer] = []

    class Recorded(MonteCLoRATrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(run, "MonteCLoRATrainer", Recorded)
    return built


def eval_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_resumes_exactly_and_reloads_its_output(tmp_path, tiny_base, trainers, method):
    config_path = method_config(tmp_path, tiny_base, method)
    assert train(config_path) == 0
    out = tmp_path / "out"
    result = metrics(out)
    assert result["status"] == "completed" and result["global_step"] == 4
    config = load_config(out / "config.json")
    assert config.method == method and config.to_dict() == load_config(config_path).to_dict()

    # The saved output reloads, the way the evaluation loads it, as the model that was trained.
    ids = torch.randint(4, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    trained = trainers[0].model
    reloaded = run.load_trained(config, torch.device("cpu")).model
    torch.testing.assert_close(eval_logits(reloaded, ids), eval_logits(trained, ids), rtol=0, atol=1e-6)
    assert_method_specifics(method, out, trainers[0])

    # Killed after step 2 (the step-4 save never completed): --resume reproduces steps 3 and 4.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copytree(out / "checkpoint-4", resumed / "checkpoint-4")
    (resumed / "checkpoint-4" / run_folder.CHECKPOINT_MARKER_JSON).unlink()
    assert train(config_path, "--set", f"training.output_dir={resumed}", "--resume") == 0
    expected, actual = step_logs(out), step_logs(resumed)
    assert {3, 4} <= set(actual) and metrics(resumed)["global_step"] == 4
    for step in (3, 4):
        assert actual[step]["loss"] == expected[step]["loss"]
        assert actual[step]["grad_norm"] == expected[step]["grad_norm"]
    again = run.load_trained(load_config(resumed / "config.json"), torch.device("cpu")).model
    torch.testing.assert_close(eval_logits(again, ids), eval_logits(reloaded, ids), rtol=0, atol=0)


def assert_method_specifics(method: str, out: Path, trainer: MonteCLoRATrainer) -> None:
    saved = run.inference_dir(load_config(out / "config.json"))
    outputs = {
        path.name for path in out.iterdir() if path.is_dir() and not path.name.startswith(("checkpoint-", "runs"))
    }
    assert outputs == ({"adapter", "lora_adapter"} if method == "monteclora" else {saved.name})
    if method == "full":
        assert (saved / "model.safetensors").is_file() and (saved / "tokenizer.json").is_file()
        return
    peft_config = json.loads((saved / "adapter_config.json").read_text())
    expected_type = {
        "monteclora": "LORA",
        "lora": "LORA",
        "dora": "LORA",
        "loraplus": "LORA",
        "prompt_tuning": "PROMPT_TUNING",
    }
    assert peft_config["peft_type"] == expected_type.get(method, method.upper())
    assert peft_config.get("use_dora", False) == (method == "dora")
    if method == "loraplus":
        rates = sorted({group["initial_lr"] for group in trainer.optimizer.param_groups if group["params"]})
        assert len(rates) == 2 and rates[1] / rates[0] == pytest.approx(8)  # B learns 8x faster than A
    if method == "adalora":
        # The budget spans the run (4 steps) and ended at r = 4 on average, from 6.
        assert peft_config["total_step"] == 4 and peft_config["rank_pattern"]
        kept = [sum(mask) for mask in peft_config["rank_pattern"].values()]
        assert sum(kept) == 4 * len(kept) and max(kept) <= 6
        assert all(ORTHOGONALITY in entry for entry in step_logs(out).values())
        assert (out / "checkpoint-2" / run_folder.CHECKPOINT_ADALORA_STATE).is_file()
    else:
        assert all(ORTHOGONALITY not in entry for entry in step_logs(out).values())
    regularised = all("kl_gaussian" in entry for entry in step_logs(out).values())
    assert regularised == (method == "monteclora")


def test_adalora_orthogonality_enters_the_training_loss_once(tmp_path, tiny_base):
    """peft adds it to `outputs.loss`, which TRL's fused loss does not use: the trainer adds it."""
    plan = run.plan_run(["--config", str(method_config(tmp_path, tiny_base, "adalora"))])
    model = attach_adapter(
        load_base_model(plan.config, torch.device("cpu"), sharded=False), plan.config, 0, False, None
    )
    trainer = MonteCLoRATrainer(
        model=model,
        args=plan.args,
        train_dataset=plan.dataset,
        processing_class=load_tokenizer(plan.config),
        method=REGISTRY["adalora"],
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    config = model.peft_config["default"]
    with_penalty = trainer.compute_loss(model, dict(batch)).item()
    config.orth_reg_weight = 0.0  # peft's forward reads the same config
    without = trainer.compute_loss(model, dict(batch)).item()
    penalty = trainer.regulariser_logs[ORTHOGONALITY][0]
    assert penalty > 0 and with_penalty - without == pytest.approx(0.5 * penalty, rel=1e-4)


def test_a_trainer_built_without_a_method_trains_monteclora_and_refuses_another_model(tmp_path, tiny_base):
    """Library users get MonteCLoRA's hooks by default (test_train_run checks its regulariser); on
    another method's model the default says to pass that method's record."""
    plan = run.plan_run(["--config", str(method_config(tmp_path, tiny_base, "lora"))])
    model = attach_adapter(
        load_base_model(plan.config, torch.device("cpu"), sharded=False), plan.config, 0, False, None
    )
    kwargs = {"args": plan.args, "train_dataset": plan.dataset, "processing_class": load_tokenizer(plan.config)}
    with pytest.raises(ValueError, match="this model has no MonteCLoRA layers"):
        MonteCLoRATrainer(model=model, **kwargs)
    assert not MonteCLoRATrainer(model=model, method=REGISTRY["lora"], **kwargs).is_monteclora


@pytest.mark.parametrize("method", ["dora", "adalora", "ia3", "prompt_tuning"])
def test_peft_methods_train_on_a_4bit_base(tmp_path, tiny_base, method):
    config = method_config(tmp_path, tiny_base, method)
    quantization = '{"mode": "nf4", "double_quant": true, "compute_dtype": "float32"}'
    assert train(config, "--set", f"quantization={quantization}", "--set", "training.max_steps=2") == 0
    out = tmp_path / "out"
    assert metrics(out)["status"] == "completed"
    model = run.load_trained(load_config(out / "config.json"), torch.device("cpu")).model
    assert any(type(module).__name__ == "Linear4bit" for module in model.modules())


# -- options, per method ------------------------------------------------------------------------------
def raw_config(method: str, **adapter) -> dict:
    return {
        "model": {"path": "/nonexistent/tiny", "build_tiny": True},
        "adapter": {"method": method, **adapter},
        "data": {"path": DATA},
        "training": {"output_dir": "unused"},
    }


@pytest.mark.parametrize(
    ("method", "adapter", "message"),
    [
        (
            "ia3",
            {"r": 8},
            "adapter.r: not an option of method 'ia3' (it takes: feedforward_modules, modules_to_save, target_modules)",
        ),
        (
            "full",
            {"target_modules": ["q_proj"]},
            "adapter.target_modules: not an option of method 'full' (it takes: no adapter options)",
        ),
        ("lora", {"loraplus_lr_ratio": 4}, "adapter.loraplus_lr_ratio: not an option of method 'lora'"),
        ("dora", {"use_dora": False}, "adapter.use_dora: not an option of method 'dora'"),
        ("prompt_tuning", {"lora_dropout": 0.1}, "adapter.lora_dropout: not an option of method 'prompt_tuning'"),
        (
            "adalora",
            {"r": 8, "init_r": 4},
            "adapter.init_r: AdaLoRA prunes from init_r down to r, so it must be >= r (8)",
        ),
        ("adalora", {"beta1": 1.5}, "adapter.beta1: must be in (0, 1), got 1.5"),
        ("loraplus", {"loraplus_lr_ratio": 0}, "adapter.loraplus_lr_ratio: must be > 0, got 0"),
        ("prompt_tuning", {"prompt_tuning_init": "TEXT"}, "adapter.prompt_tuning_init_text: must be set exactly when"),
        (
            "ia3",
            {"target_modules": "all-linear"},
            "adapter.feedforward_modules: required for IA³ when target_modules is a pattern",
        ),
        ("lokr", {"decompose_factor": "2"}, 'adapter.decompose_factor: expected integer, got "2"'),
        ("fancy", {}, "adapter.method: must be one of"),
    ],
)
def test_an_option_of_another_method_or_a_bad_value_is_a_one_line_error(method, adapter, message):
    with pytest.raises(UserError) as error:
        validate_config(raw_config(method, **adapter))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


ZERO2, ZERO3 = (str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / f"zero{n}.json") for n in (2, 3))


@pytest.mark.parametrize(
    ("method", "section", "message"),
    [
        ("full", {"quantization": {"mode": "nf4"}}, "quantization.mode: full fine-tuning trains every weight"),
        ("loha", {"quantization": {"mode": "nf4"}}, "quantization.mode: peft's loha has no bitsandbytes layers"),
        ("adalora", {"distributed": {"fsdp": {}}}, "distributed: AdaLoRA's rank allocation reads whole weights"),
        (
            "adalora",
            {"distributed": {"deepspeed": ZERO3}},
            "distributed: AdaLoRA's rank allocation reads whole weights",
        ),
        (
            "lora",
            {"quantization": {"mode": "int8"}, "distributed": {"fsdp": {}}},
            "quantization.mode: bitsandbytes' 8-bit weights cannot be sharded",
        ),
        (
            "adalora",
            {"distributed": {"deepspeed": ZERO2}},
            "distributed.deepspeed: AdaLoRA's rank allocation reads the gradients after",
        ),
        (
            "prompt_tuning",
            {"distributed": {"fsdp": {}}},
            "distributed.fsdp: peft saves prompt tuning by running its prompt encoder",
        ),
        (
            "loha",
            {"distributed": {"deepspeed": ZERO3}},
            "distributed.deepspeed: peft's LoHa sizes its factors from the base weight's shape",
        ),
    ],
)
def test_what_a_method_cannot_do_with_the_rest_of_the_config_is_refused(method, section, message):
    with pytest.raises(UserError, match=f"^{message}"):
        validate_config(raw_config(method) | section)


def test_monteclora_settings_are_ignored_with_a_warning_by_the_other_methods(caplog):
    with caplog.at_level(logging.WARNING, logger="monte_ds.train.methods"):
        config = validate_config(raw_config("dora", r=4, n_components=8, kl_weight=0.1))
    assert "method 'dora' ignores the MonteCLoRA settings kl_weight, n_components" in caplog.text
    resolved = config.to_dict()["adapter"]
    assert resolved["r"] == 4 and "n_components" not in resolved and "seed" not in resolved


@pytest.mark.parametrize("method", METHODS)
def test_the_resolved_config_holds_exactly_the_methods_options_and_reloads(method, tmp_path):
    rank = {"r": 4} if "r" in ACCEPTED[method] else {}
    config = validate_config(raw_config(method, **rank, **METHOD_SETTINGS.get(method, {})))
    adapter = config.to_dict()["adapter"]
    assert set(adapter) == {"method", *ACCEPTED[method]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(path).config_hash() == config.config_hash()

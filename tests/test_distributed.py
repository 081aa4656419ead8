"""Two ranks on gloo (CPU), launched the way users launch: DDP, DeepSpeed ZeRO-2/ZeRO-3 and FSDP2.

What a preempted multi-node MonteCLoRA run needs, each compared with plain DDP or with the
uninterrupted run: the same optimisation under every sharding, the same gradients of v and alpha
under ZeRO-3 with activation checkpointing and accumulation, exact resume after the
launcher and all ranks were SIGKILLed, resume after the ZeRO-3 trace changed (eval forwards between
steps, mixed ranks), 4-bit bases sharded, and every method trained, saved and reloaded under each
sharding. All slow: each run starts two processes (about a minute here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from monte_ds.train import checkpoints
from monte_ds.train.config import load_config
from monte_ds.train.methods import METHODS
from monte_ds.train.run import inference_dir, load_trained
from tests.distributed_worker import FIXED_INPUT
from tests.test_real_model import prepared  # noqa: F401 (a fixture)
from tests.test_train_run import metrics, step_logs, tiny_base, write_config  # noqa: F401 (tiny_base: a fixture)


pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"

# accelerate enables FSDP only on accelerators; this lets its FSDP2 path run on CPU/gloo processes.
CPU_FSDP_SHIM = """
import accelerate.state as state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_allowing_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate syncs it


state.AcceleratorState.__init__ = _init_allowing_cpu_fsdp
"""

LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
    "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port"],
}
ZERO2 = "distributed.deepspeed=configs/deepspeed/zero2.json"
ZERO3 = "distributed.deepspeed=configs/deepspeed/zero3.json"
FSDP2 = 'distributed.fsdp={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}'
SETUPS = {  # both launchers are covered: `deepspeed` passes --local_rank, torchrun sets LOCAL_RANK only
    "zero2": ("torchrun", ZERO2),
    "zero3": ("deepspeed", ZERO3),
    "fsdp2": ("torchrun", FSDP2),
}
# configs/llama7b.json's checkpointing: non-reentrant, the default (reentrant is refused under plain DDP:
# see test_train_config).
CHECKPOINTING = ["training.activation_checkpointing=true"]
# What TRL sets for PEFT under ZeRO-3: each block's backward replays it in a backward of its own.
REENTRANT = [*CHECKPOINTING, 'training.activation_checkpointing_kwargs={"use_reentrant": true}']
NF4 = 'quantization={"mode": "nf4", "double_quant": true, "compute_dtype": "float32"}'


class Job:
    """One 2-rank job: records in `record`, outputs in `record/out`."""

    def __init__(self, root: Path, name: str) -> None:
        self.record = root / name
        self.out = self.record / "out"

    def ranks(self, method: str = "") -> list[dict]:
        return [torch.load(self.record / method / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, tiny_base):
    """`jobs(name, launcher, *overrides, ...)` runs (at most once per module) the 4-step job."""
    root = tmp_path_factory.mktemp("two-ranks")
    (root / "shim").mkdir()
    (root / "shim" / "sitecustomize.py").write_text(CPU_FSDP_SHIM)
    config = write_config(
        root,
        tiny_base,
        training={
            "max_steps": 4,
            "gradient_accumulation_steps": 2,
            "per_device_train_batch_size": 2,
            "save_steps": 2,
            "ddp_backend": "gloo",
            "ddp_timeout": 300,  # a hang fails the job in minutes (the stall watchdog), not in 30
        },
    )
    done: dict[str, Job] = {}
    ports = iter(range(29611, 29700))

    def run(
        name: str,
        launcher: str,
        *overrides: str,
        resume_from: Path | None = None,
        resume: bool = False,
        kill_at: int | None = None,
        env: dict[str, str] | None = None,
    ) -> Job:
        """`resume_from`: a checkpoint to copy and go on from; `resume`: go on in this job's own
        folder; `kill_at`: SIGKILL the launcher and both ranks once checkpoint-`kill_at` is complete."""
        if name in done:
            return done[name]
        job = Job(root, name.removesuffix("@resumed"))
        job.record.mkdir(exist_ok=True)
        if resume_from is not None:
            shutil.copytree(resume_from, job.out / resume_from.name)
        environment = {
            **os.environ,
            "RECORD_DIR": str(job.record),
            "MONTE_DS_TEST_OUTPUT_DIR": str(job.out),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        if any(override.startswith("distributed.fsdp") for override in overrides):
            environment["PYTHONPATH"] = os.pathsep.join([str(root / "shim"), environment.get("PYTHONPATH", "")])
        command = [*LAUNCHERS[launcher], str(next(ports)), str(WORKER), "--config", str(config)]
        command += ["--set", f"training.output_dir={job.out}"]
        for override in overrides:
            command += ["--set", override]
        if resume_from is not None or resume:
            command.append("--resume")
        if kill_at is not None:
            environment["MONTE_DS_TEST_PAUSE_AT"] = str(kill_at)
            _run_until_killed(command, environment, job.out / f"checkpoint-{kill_at}")
        else:
            result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        done[name] = job
        return job

    return run


def _run_until_killed(command: list[str], environment: dict[str, str], checkpoint: Path) -> None:
    """Preemption: SIGKILL the launcher and every rank (one process group) mid-run."""
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 900
    try:
        while not checkpoints.is_complete(checkpoint):
            assert process.poll() is None, f"the job ended (exit {process.returncode}) before {checkpoint.name}"
            assert time.monotonic() < deadline, f"{checkpoint.name} never completed"
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def assert_same_tensors(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def assert_same_steps(actual: Path, expected: Path, steps: list[int]) -> None:
    """Every logged value of these steps (loss, each regulariser term, grad norm) equals the uninterrupted run's."""
    actual_logs, expected_logs = step_logs(actual), step_logs(expected)
    for step in steps:
        for key, value in expected_logs[step].items():
            assert actual_logs[step][key] == value, f"step {step}: {key}"


def sampler_grads(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stacked = {name: g for name, g in grads.items() if name.endswith("monteclora_log_params")}
    assert stacked, "no stacked ln v / ln alpha gradient recorded"
    return stacked


# -- the same optimisation under every sharding ------------------------------------------------------
@pytest.mark.parametrize("setup", ["zero2", "zero3", "fsdp2"])
def test_two_ranks_match_ddp_agree_with_each_other_and_draw_different_noise(jobs, setup):
    """Sharding must not change the optimisation: 2 ranks under ZeRO-2/ZeRO-3/FSDP2 end where 2 DDP
    ranks end (same data split, same per-rank noise), both ranks hold the same adapter, the saved
    adapter is complete, and the ranks drew different noise (M = 2 Monte-Carlo samples per step)."""
    ddp = jobs("ddp", "torchrun").ranks()
    job = jobs(setup, *SETUPS[setup])
    ranks = job.ranks()

    assert_same_tensors(ranks[0]["adapter"], ranks[1]["adapter"], atol=0)
    assert ranks[0]["first_step"]["kl_gaussian"] != ranks[1]["first_step"]["kl_gaussian"]
    saved = load_file(job.out / "adapter" / "adapter_model.safetensors")
    assert_same_tensors(saved, ranks[0]["adapter"], atol=0)  # complete, not the empty ZeRO-3 file
    assert checkpoints.is_complete(job.out / "checkpoint-4")
    assert_same_tensors(ranks[0]["adapter"], ddp[0]["adapter"], atol=1e-6)
    assert_same_tensors(ranks[0]["grads"], ddp[0]["grads"], atol=1e-6)


# -- ZeRO-3 + activation checkpointing + accumulation: the gradients of v and alpha ------------------
def test_zero3_with_activation_checkpointing_and_accumulation_gives_v_and_alpha_the_gradients_of_ddp(jobs):
    """The flagship setup: ZeRO-3 with activation checkpointing and accumulation 2. The blocks are
    recomputed in the backward, v and alpha are reduced in partitions over two micro-steps (the
    first copied, the second added); recomputation changes no value, so the reference is DDP
    without checkpointing."""
    ddp = jobs("ddp", "torchrun").ranks()
    zero3 = jobs("zero3-checkpointing", *SETUPS["zero3"], *CHECKPOINTING).ranks()
    expected, actual = sampler_grads(ddp[0]["grads"]), sampler_grads(zero3[0]["grads"])
    (stacked,) = expected.values()  # ln v and ln alpha of 7 projections x 2 layers, one tensor
    assert stacked.shape[0] == 14 and (stacked.abs() > 0).any(dim=1).all()
    assert_same_tensors(actual, expected, atol=1e-7)
    assert_same_tensors(zero3[0]["grads"], ddp[0]["grads"], atol=1e-6)  # A and B too
    assert_same_tensors(zero3[0]["adapter"], ddp[0]["adapter"], atol=1e-6)


@pytest.mark.parametrize("setup", ["zero2", "zero3"])
def test_zero_with_reentrant_checkpointing_and_accumulation_gives_v_and_alpha_the_gradients_of_ddp(jobs, setup):
    """Reentrant checkpointing replays each block in a backward of its own, which reaches the step
    node with that block's gradients only: several gradients of v and alpha per micro-step, where
    ZeRO-2 and ZeRO-3 reduce a parameter's gradient once. They are held and handed over in one piece
    with the regulariser's, so v, alpha, A and B get DDP's gradients, and the run ends where DDP's ends."""
    ddp = jobs("ddp", "torchrun").ranks()
    zero3 = jobs(f"{setup}-reentrant", *SETUPS[setup], *REENTRANT).ranks()
    assert_same_tensors(sampler_grads(zero3[0]["grads"]), sampler_grads(ddp[0]["grads"]), atol=1e-7)
    assert_same_tensors(zero3[0]["grads"], ddp[0]["grads"], atol=1e-6)
    assert_same_tensors(zero3[0]["adapter"], ddp[0]["adapter"], atol=1e-6)
    assert_same_tensors(zero3[1]["adapter"], zero3[0]["adapter"], atol=0)


# -- resume after preemption ---------------------------------------------------------------------
@pytest.mark.parametrize("checkpointing", ["checkpointing", "reentrant"])
def test_zero3_resume_after_sigkill_reproduces_the_uninterrupted_run(jobs, checkpointing):
    """ZeRO-3 + activation checkpointing (non-reentrant, and reentrant) + accumulation 2: the
    launcher and both ranks are SIGKILLed once checkpoint-2 is complete; `--resume` gives steps 3-4
    exactly (partitioned optimizer state, per-rank RNG, the sampler counter) and the same saved adapter."""
    overrides = (*SETUPS["zero3"], *(REENTRANT if checkpointing == "reentrant" else CHECKPOINTING))
    full = jobs(f"zero3-{checkpointing}", *overrides)
    jobs(f"zero3-{checkpointing}-killed", *overrides, kill_at=2)
    resumed = jobs(f"zero3-{checkpointing}-killed@resumed", *overrides, resume=True)
    assert not (resumed.out / "checkpoint-2" / "missing").exists()
    assert_same_steps(resumed.out, full.out, [3, 4])
    assert_same_tensors(resumed.ranks()[0]["adapter"], full.ranks()[0]["adapter"], atol=0)
    assert_same_tensors(
        load_file(resumed.out / "adapter" / "adapter_model.safetensors"),
        load_file(full.out / "adapter" / "adapter_model.safetensors"),
        atol=0,
    )


def test_zero3_resume_reproduces_the_uninterrupted_run(jobs):
    """No checkpointing, accumulation 2, AdamW: partitioned optimizer state plus the sampler counter."""
    full = jobs("zero3", *SETUPS["zero3"])
    resumed = jobs("zero3-resumed", *SETUPS["zero3"], resume_from=full.out / "checkpoint-2")
    assert_same_steps(resumed.out, full.out, [3, 4])
    assert_same_tensors(resumed.ranks()[0]["adapter"], full.ranks()[0]["adapter"], atol=0)


def test_zero3_evaluation_during_training_then_resume_with_mixed_ranks_and_no_accumulation(jobs):
    """`eval_strategy: steps` after every step: each evaluation changes ZeRO-3's module trace (as
    generation between steps does). With mixed ranks and accumulation 1, resuming from checkpoint-2
    still gives identical training steps, identical eval losses and the same adapter."""
    overrides = (
        *SETUPS["zero3"],
        "training.gradient_accumulation_steps=1",
        'adapter.rank_pattern={"v_proj": 2}',
        "training.eval_strategy=steps",
        "training.eval_steps=1",
        "data.eval_size=6",
    )
    full = jobs("zero3-eval", *overrides)
    resumed = jobs("zero3-eval-resumed", *overrides, resume_from=full.out / "checkpoint-2")
    assert_same_steps(resumed.out, full.out, [3, 4])
    evals = {
        run: {e["step"]: e["eval_loss"] for e in metrics(run.out)["log_history"] if "eval_loss" in e}
        for run in (full, resumed)
    }
    assert sorted(evals[full]) == sorted(evals[resumed]) == [1, 2, 3, 4]  # 1-2 restored with the checkpoint
    assert all(evals[resumed][step] == evals[full][step] for step in (3, 4))
    adapter = resumed.ranks()[0]["adapter"]
    assert_same_tensors(adapter, full.ranks()[0]["adapter"], atol=0)
    assert {tuple(t.shape) for key, t in adapter.items() if "v_proj.lora_A" in key and key.endswith("weight")} == {
        (2, 64)
    }


# -- 4-bit bases sharded ---------------------------------------------------------------------------
@pytest.mark.parametrize("setup", ["zero3", "fsdp2"])
def test_qlora_shards_a_4bit_base(jobs, setup):
    """The multi-GPU QLoRA path: the 4-bit storage is the compute dtype, so zero.Init and FSDP2
    shard it; both ranks end with the same complete fp32 adapter, having drawn different noise."""
    job = jobs(f"{setup}-nf4", "torchrun", SETUPS[setup][1], NF4)
    ranks = job.ranks()
    assert_same_tensors(ranks[0]["adapter"], ranks[1]["adapter"], atol=0)
    assert ranks[0]["first_step"]["kl_gaussian"] != ranks[1]["first_step"]["kl_gaussian"]
    saved = load_file(job.out / "adapter" / "adapter_model.safetensors")
    assert_same_tensors(saved, ranks[0]["adapter"], atol=0)
    assert all(tensor.dtype == torch.float32 for tensor in saved.values())


# -- every method under every sharding ----------------------------------------------------------------
REFUSED = {
    "zero2": {"adalora"},
    "zero3": {"adalora", "loha"},
    "fsdp2": {"adalora", "prompt_tuning"},
}  # test_methods: one line each


@pytest.mark.parametrize("setup", ["zero2", "zero3", "fsdp2"])
def test_every_method_trains_saves_a_complete_adapter_and_reloads_under_sharding(jobs, setup):
    """Each method (its adapter's own options at their defaults) trains 2 steps in one 2-rank job,
    saves what inference needs (not the empty adapter of trl#4416 / peft#2892), and that reloads,
    without monte-ds's training stack, into the model that was trained (same eval logits)."""
    methods = [method for method in METHODS if method not in REFUSED[setup]]
    launcher, override = SETUPS[setup]
    job = jobs(
        f"{setup}-methods",
        launcher,
        override,
        "adapter={}",
        "training.max_steps=2",
        env={"MONTE_DS_TEST_METHODS": ",".join(methods)},
    )
    for method in methods:
        out = job.out / method
        config = load_config(out / "config.json")
        assert json.loads((out / "metrics.json").read_text())["status"] == "completed", method
        files = list(inference_dir(config).glob("*.safetensors"))
        assert files and all(tensor.numel() > 0 for f in files for tensor in load_file(f).values()), method
        trained = job.ranks(method)
        torch.testing.assert_close(trained[0]["logits"], trained[1]["logits"], rtol=0, atol=0, msg=method)
        with torch.no_grad():
            reloaded = load_trained(config, torch.device("cpu")).model(input_ids=FIXED_INPUT).logits
        torch.testing.assert_close(reloaded, trained[0]["logits"], rtol=0, atol=1e-5, msg=method)


# -- the flagship run on a real pretrained base ---------------------------------------------------
def test_zero3_checkpointed_run_on_the_real_model_resumes_exactly_after_sigkill(jobs, prepared):
    """`configs/llama7b.json`'s setup (ZeRO-3, activation checkpointing) on
    SmolLM2-135M-Instruct (GQA, tied embeddings, its chat template), killed and resumed."""
    overrides = (
        *SETUPS["zero3"],
        *CHECKPOINTING,
        f"model.path={prepared}",
        "data.path=bundled:tiny_chat.jsonl",
        'adapter={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}',
        "training.max_length=48",
        "training.per_device_train_batch_size=1",
    )
    full = jobs("real-zero3", *overrides)
    jobs("real-zero3-killed", *overrides, kill_at=2)
    resumed = jobs("real-zero3-killed@resumed", *overrides, resume=True)
    assert_same_steps(resumed.out, full.out, [3, 4])
    assert_same_tensors(resumed.ranks()[0]["adapter"], full.ranks()[0]["adapter"], atol=0)

"""One rank of the real `monte-ds train` recipe, recording what the 2-rank tests compare.

Started by tests/test_distributed.py under torchrun or the deepspeed launcher. Per rank it writes
RECORD_DIR/rank<r>.pt with the first step's regulariser terms, the first optimizer step's
gradients of every adapter parameter (reduced over ranks, whole), the gathered adapter and the
trained model's eval logits on a fixed input. Test-only behaviour, by environment variable:

- MONTE_DS_TEST_PAUSE_AT=N: sleep once checkpoint-N is complete (the test then SIGKILLs the job);
- MONTE_DS_TEST_METHODS=a,b,...: train each method in turn in this process group, each in
  <output_dir>/<method>, recording into RECORD_DIR/<method>/.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from monte_ds.errors import run_cli
from monte_ds.monteclora import monteclora_losses
from monte_ds.monteclora.io import _full_cpu_state, _unwrap
from monte_ds.train import checkpoints, run


FIXED_INPUT = torch.arange(3, 19).reshape(2, 8)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().to("cpu", copy=True)


def _trained_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trained parameters by their names inside any DDP/DeepSpeed wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class Record(TrainerCallback):
    def __init__(self, trainer: run.MonteCLoRATrainer, record_dir: Path) -> None:
        self.trainer, self.record_dir = trainer, record_dir
        self.first_step: dict[str, float] | None = None
        self.grads: dict[str, torch.Tensor] | None = None

    def record_grads(self, grad_of) -> None:
        """The first optimizer step's gradients (collective under ZeRO-3: every rank calls it)."""
        if self.grads is None:
            self.grads = {name: _full(grad_of(p)) for name, p in _trained_parameters(self.trainer.model)}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # DDP, FSDP2 (DeepSpeed: see below)
        if not self.trainer.is_deepspeed_enabled:
            self.record_grads(lambda p: p.grad)

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step is None and self.trainer.is_monteclora:
            self.first_step = {k: v.item() for k, v in monteclora_losses(self.trainer.model).items()}

    def on_save(self, args, state, control, **kwargs):
        pause_at = os.environ.get("MONTE_DS_TEST_PAUSE_AT")
        if pause_at and state.global_step == int(pause_at):
            assert checkpoints.is_complete(Path(args.output_dir) / f"checkpoint-{pause_at}")
            time.sleep(600)  # killed here by the test

    def _eval_forward(self) -> torch.Tensor:
        model = self.trainer.model
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=FIXED_INPUT.to(self.trainer.args.device)).logits
        model.train()
        return logits.detach().to("cpu").float()

    def on_train_end(self, args, state, control, **kwargs):
        logits = self._eval_forward()  # collective under ZeRO-3 and FSDP2
        is_monte = self.trainer.is_monteclora
        adapter = _full_cpu_state(_unwrap(self.trainer.model), "default") if is_monte else None
        self.record_dir.mkdir(parents=True, exist_ok=True)
        rank = torch.distributed.get_rank()
        record = {"first_step": self.first_step, "grads": self.grads, "adapter": adapter, "logits": logits}
        torch.save(record, self.record_dir / f"rank{rank}.pt")


RECORDERS: list[Record] = []


def _record_deepspeed_grads() -> None:
    """DeepSpeed steps inside accelerate's backward, after the Trainer's pre-optimizer-step
    callback: read the reduced fp32 gradients just before the engine's first optimizer step."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad

    step = DeepSpeedEngine.step

    def recording_step(self, *args, **kwargs):
        if self.is_gradient_accumulation_boundary() and RECORDERS:
            RECORDERS[-1].record_grads(safe_get_full_grad)
        return step(self, *args, **kwargs)

    DeepSpeedEngine.step = recording_step


class RecordingTrainer(run.MonteCLoRATrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RECORDERS.append(Record(self, Path(os.environ["RECORD_DIR"]) / os.environ.get("MONTE_DS_TEST_METHOD", "")))
        self.add_callback(RECORDERS[-1])


def main(argv: list[str]) -> int:
    _record_deepspeed_grads()
    run.MonteCLoRATrainer = RecordingTrainer
    methods = os.environ.get("MONTE_DS_TEST_METHODS")
    if not methods:
        return run_cli(run.main, argv)
    output_dir = Path(os.environ["MONTE_DS_TEST_OUTPUT_DIR"])
    for method in methods.split(","):
        os.environ["MONTE_DS_TEST_METHOD"] = method
        flags = ["--set", f"adapter.method={method}", "--set", f"training.output_dir={output_dir / method}"]
        code = run_cli(run.main, [*argv, *flags])
        if code != 0:
            return code
        unset_hf_deepspeed_config()  # as in a fresh process: the next plan's checks see no ZeRO-3 run
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

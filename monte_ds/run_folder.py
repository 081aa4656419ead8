"""The output folder of a training run: its file names, its statuses and `monte-ds train`'s exit codes.

`monte-ds train` writes it, resume reads its checkpoints, and `monte-ds sweep` reads each run's
result from it; they all name its parts through this module (docs/training.md, "Output directory"):

    config.json        the resolved config         metrics.json   status, steps, loss, log history
    checkpoint-N/      resumable checkpoints       runs/          TensorBoard logs
    adapter/           method monteclora: the MonteCLoRA adapter (monte_ds.load_adapter)
    lora_adapter/      a plain peft LoRA adapter: MonteCLoRA's means, or the adapter of lora, dora, loraplus
    peft_adapter/      the peft adapter of adalora, ia3, loha, lokr, prompt_tuning
    model/             method full: the fine-tuned model and its tokenizer
    report/            the evaluation report, when eval.suites is set
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from monte_ds.errors import EXIT_USER_ERROR  # noqa: F401  (the exit codes of `monte-ds train`, all here)
from monte_ds.monteclora.io import SAMPLER_JSON


CONFIG_JSON = "config.json"
METRICS_JSON = "metrics.json"
ADAPTER_DIR = "adapter"
LORA_ADAPTER_DIR = "lora_adapter"
PEFT_ADAPTER_DIR = "peft_adapter"
MODEL_DIR = "model"
REPORT_DIR = "report"
# What a finished run leaves besides its checkpoints (a fresh run in the same folder removes them).
RESULTS = (ADAPTER_DIR, LORA_ADAPTER_DIR, PEFT_ADAPTER_DIR, MODEL_DIR, REPORT_DIR, METRICS_JSON)

# Inside checkpoint-N/, besides the Trainer's files.
CHECKPOINT_MARKER_JSON = "monte_ds_checkpoint.json"  # written last: the checkpoint is complete
CHECKPOINT_SAMPLER_JSON = SAMPLER_JSON  # MonteCLoRA's noise counter, as in a saved adapter
CHECKPOINT_ADALORA_STATE = "adalora_allocator.pt"  # AdaLoRA's rank allocator

# metrics.json's "status": both are results (a restart does not train them again).
Status = Literal["completed", "diverged"]
COMPLETED: Status = "completed"
DIVERGED: Status = "diverged"

EXIT_COMPLETED = 0
EXIT_DIVERGED = 3
EXIT_STALLED = 4  # a multi-rank run made no progress for `training.ddp_timeout` seconds (a hang)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object the run wrote, or None where it is missing or unreadable (an interrupted run)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json of a finished run; None before it finished."""
    return read_json(Path(run_dir) / METRICS_JSON)


def read_status(run_dir: Path) -> str | None:
    """The run's status, or None when it has not finished."""
    metrics = read_metrics(run_dir)
    return None if metrics is None else metrics.get("status")

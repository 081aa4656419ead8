"""Checkpoints that resume can trust.

The Trainer writes `checkpoint-N/` file by file, from several ranks. A checkpoint counts only once
`checkpoint-N/monte_ds_checkpoint.json` (`run_folder.CHECKPOINT_MARKER_JSON`) exists: it is written atomically, by the main process,
after every rank has finished writing (and after the MonteCLoRA sampler state is in). A process
killed mid-save leaves a folder without it, which resume skips and the next run removes.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from monte_ds.atomic import atomic_write_json
from monte_ds.run_folder import CHECKPOINT_MARKER_JSON, CHECKPOINT_SAMPLER_JSON


logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders, complete or not, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found)]


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / CHECKPOINT_MARKER_JSON).is_file()


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    complete = [path for path in checkpoint_dirs(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def remove_incomplete(output_dir: str | Path) -> list[Path]:
    """Delete checkpoint folders a killed save left behind (main process only)."""
    removed = [path for path in checkpoint_dirs(output_dir) if not is_complete(path)]
    for path in removed:
        logger.warning("removing incomplete checkpoint %s (its save was interrupted)", path)
        shutil.rmtree(path, ignore_errors=True)
    return removed


def mark_complete(checkpoint: Path, global_step: int, num_tokens: int = 0) -> None:
    """Written last. `num_tokens`: TRL's count of tokens trained on, which its logs carry and its
    checkpoints do not, so that a resumed run logs the uninterrupted run's counts."""
    atomic_write_json(checkpoint / CHECKPOINT_MARKER_JSON, {"global_step": global_step, "num_tokens": num_tokens})


def read_marker(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / CHECKPOINT_MARKER_JSON).read_text())


def write_sampler_state(checkpoint: Path, state: dict[str, Any]) -> None:
    atomic_write_json(checkpoint / CHECKPOINT_SAMPLER_JSON, state)


def read_sampler_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / CHECKPOINT_SAMPLER_JSON).read_text())

"""benchmarks/collectives.py on 2 gloo ranks: under FSDP2, MonteCLoRA's ln v and ln alpha cost one
all-gather and one reduce-scatter per step beyond LoRA's, whatever the number of layers (they were
two of each per adapted layer before they were stacked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fsdp2_adds_one_all_gather_and_one_reduce_scatter_per_step(tmp_path):
    out = tmp_path / "collectives.json"
    command = [sys.executable, str(REPO / "benchmarks" / "collectives.py"), "--num-layers", "3", "--json", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(out.read_text())
    assert counts["adapted_layers"] == 21
    assert counts["extra_per_step"] == 2
    extra = {name: n - counts["per_step"]["lora"].get(name, 0) for name, n in counts["per_step"]["monte-ds"].items()}
    assert sorted(n for n in extra.values() if n) == [1, 1]
    assert any("allgather" in name for name, n in extra.items() if n) and any(
        "reduce_scatter" in name for name, n in extra.items() if n
    )

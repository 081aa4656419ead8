#!/usr/bin/env bash
# The robustness study end to end, from the repository root: generated data, a pre-trained
# base model, then LoRA and MonteCLoRA over a learning-rate x batch-size grid (docs/robustness.md).
# Every step can be re-run: the data are regenerated identically, the base model is kept once
# trained, and the sweep skips the runs it has finished.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
WORK=outputs/robustness  # studies/robustness/base.json reads the data and the base model from here

"$PYTHON" studies/robustness/make_data.py --out "$WORK/data"
if [ ! -f "$WORK/base/model.safetensors" ]; then
    "$PYTHON" studies/robustness/pretrain.py --data "$WORK/data" --out "$WORK/base"
fi
"$PYTHON" -m monte_ds.cli sweep --config studies/robustness/base.json \
    --grid training.learning_rate=3e-4,1e-3,3e-3,1e-2 \
    --grid training.per_device_train_batch_size=8,32 \
    --methods lora,monteclora --seeds 0 \
    --output "$WORK/sweep" "$@"

#!/usr/bin/env bash
# The robustness study end to end, from the repository root: generated data, a pre-trained base
# model, then MonteCLoRA against LoRA, DoRA and AdaLoRA over a learning-rate x batch-size grid
# (docs/robustness.md). Every step can be re-run: the data are regenerated identically, the base
# model is kept once trained, and each sweep skips the runs it has finished, so an interrupted
# study continues where it stopped. The sweeps run in the order the runs matter: seed 0 of LoRA
# and MonteCLoRA, their seed 1 (16 matched pairs), DoRA and AdaLoRA on seed 0, then seed 2 (24
# pairs). Arguments are passed to every sweep (e.g. --plan-only).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
WORK=outputs/robustness  # studies/robustness/base.json reads the data and the base model from here

sweep() {
    "$PYTHON" -m monte_ds.cli sweep --config studies/robustness/base.json \
        --grid training.learning_rate=3e-4,1e-3,3e-3,1e-2 \
        --grid training.per_device_train_batch_size=8,32 \
        --output "$WORK/sweep" "$@"
}

"$PYTHON" studies/robustness/make_data.py --out "$WORK/data"
if [ ! -f "$WORK/base/model.safetensors" ]; then
    "$PYTHON" studies/robustness/pretrain.py --data "$WORK/data" --out "$WORK/base"
fi
sweep --methods lora,monteclora --seeds 0 "$@"
sweep --methods lora,monteclora --seeds 0,1 "$@"
sweep --methods dora,adalora --seeds 0 "$@"
sweep --methods lora,monteclora --seeds 0,1,2 "$@"
# One report over everything: MonteCLoRA against each method on the matched runs.
sweep --methods lora,dora,adalora,monteclora --seeds 0,1,2 --report-only

#!/usr/bin/env bash
# Issue 20's study end to end, from the repository root: is MonteCLoRA more robust to the learning
# rate and batch size than LoRA, DoRA and AdaLoRA on a real pretrained base (SmolLM2-135M-Instruct,
# prepared by monte-ds on first use)? Generated held-out tasks (docs/robustness.md), a 4 learning
# rates x 2 batch sizes grid, 3 seeds for LoRA and MonteCLoRA (24 matched pairs) and 1 for DoRA and
# AdaLoRA (8 pairs each); MonteCLoRA is scored at its mean and posterior-predictive (10 draws).
#
# It runs at the lowest CPU priority (nice 19) and is restartable: the data are regenerated
# identically, and each sweep skips the runs it has finished, so an interrupted study continues
# where it stopped. The sweeps run in the order the runs matter: every method at seed 0 first
# (8 pairs against each method), then seeds 1 and 2 of LoRA and MonteCLoRA. Arguments are passed
# to every sweep (e.g. --plan-only: print the commands of the runs still to do, train nothing).
# WORK (default outputs/smollm2-robustness) holds the data and the sweep.
set -euo pipefail
if [ "$(nice)" -lt 19 ]; then exec nice -n 19 "$0" "$@"; fi
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
WORK=${WORK:-outputs/smollm2-robustness}

sweep() {
    "$PYTHON" -m monte_ds.cli sweep --config studies/smollm2-robustness/base.json \
        --grid training.learning_rate=1e-4,5e-4,2e-3,1e-2 \
        --grid training.per_device_train_batch_size=4,8 \
        --set "data.path=$WORK/data/finetune.jsonl" --set "eval.data_dir=$WORK/data/eval" \
        --set-for monteclora:eval.predictive_samples=10 \
        --output "$WORK/sweep" "$@"
}

"$PYTHON" studies/smollm2-robustness/make_data.py --out "$WORK/data"
sweep --methods lora,monteclora --seeds 0 "$@"        # 16 runs: 8 matched pairs
sweep --methods dora,adalora --seeds 0 "$@"           # +16: 8 pairs against DoRA and against AdaLoRA
sweep --methods lora,monteclora --seeds 0,1,2 "$@"    # +32: 24 MonteCLoRA-LoRA pairs
# One report over everything: MonteCLoRA against each method on the matched runs (DoRA's and
# AdaLoRA's seeds 1 and 2 are not in the plan and are listed as pending).
sweep --methods lora,dora,adalora,monteclora --seeds 0,1,2 --report-only

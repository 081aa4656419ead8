"""Write the study's data: the generated tasks (held-out test items) and the fine-tuning set.

    python studies/smollm2-robustness/make_data.py --out outputs/smollm2-robustness/data [--seed 0]

<out>/eval/synth_gsm8k/{train,test}.jsonl and <out>/eval/synth_mc/{train,test}.jsonl are
`monte_ds.evaluation.generated` (the `data_dir` of the evaluation); <out>/finetune.jsonl holds
both tasks' training items as {"prompt", "completion"} in the tasks' own lm-eval prompt formats
(a word problem's reasoning and `#### n`, a multiple-choice item's gold letter), interleaved in a
seeded order so that every batch mixes the two tasks. The same seed writes the same bytes, so a
re-run of the study regenerates exactly the data its finished runs used.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from monte_ds.atomic import atomic_write_text
from monte_ds.evaluation.generated import TASKS, jsonl, prompt_completion, write_tasks
from monte_ds.evaluation.tasks import load_tasks, task_configs, task_manager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=500, help="training items per task")
    parser.add_argument("--test", type=int, default=200, help="held-out test items per task")
    args = parser.parse_args()

    eval_dir = args.out / "eval"
    write_tasks(eval_dir, args.seed, args.train, args.test)
    manager = task_manager()
    tasks = load_tasks(manager, task_configs(manager, list(TASKS), str(eval_dir), 0, 1), 0)
    examples = [
        prompt_completion(tasks[name], json.loads(line))
        for name in TASKS
        for line in (eval_dir / name / "train.jsonl").read_text().splitlines()
    ]
    random.Random(args.seed).shuffle(examples)
    atomic_write_text(args.out / "finetune.jsonl", jsonl(examples))
    print(f"{args.out}: {len(examples)} fine-tuning examples; test items per task: {args.test}")


if __name__ == "__main__":
    main()

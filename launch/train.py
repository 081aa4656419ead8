"""Train from a JSON config; the same script under every launcher:

    python launch/train.py --config configs/tiny.json
    torchrun --nproc_per_node 8 launch/train.py --config configs/llama7b.json
    deepspeed --hostfile hostfile launch/train.py --config configs/llama7b.json
    accelerate launch launch/train.py --config ...

Flags: --set dotted.key=value (repeatable), --resume. See docs/training.md.
"""

import sys

from monte_ds.errors import run_cli
from monte_ds.train.run import main


if __name__ == "__main__":
    sys.exit(run_cli(main))

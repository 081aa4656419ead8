"""Collectives per FSDP2 training step: MonteCLoRA against plain LoRA, on 2 ranks.

Each decoder layer and the root are `fully_shard`-ed (torch's FSDP2, as accelerate's FSDP2 plugin
does). MonteCLoRA's ln v and ln alpha are one stacked parameter per adapter, read whole once per
forward (one all-gather) and reduced once per backward (one reduce-scatter), whatever the number
of layers; the benchmark counts every collective a step launches (torch.profiler, the c10d ops)
and reports MonteCLoRA minus LoRA. Counts, not times: they do not depend on the machine's load.

    .venv/bin/python benchmarks/collectives.py --num-layers 8 --json outputs/collectives.json

gloo on CPU by default; `--backend nccl` on a 2-GPU node.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from monte_ds import MonteCLoRAConfig, get_monteclora_model, monteclora_losses
from monte_ds.atomic import atomic_write_json
from monte_ds.errors import UserError, run_cli
from monte_ds.monteclora.model import lora_config


METHODS = ("lora", "monte-ds")
WORLD_SIZE = 2
# Collective launches: the process group's c10d ops (DTensor's functional collectives dispatch to
# them, so counting those too would count twice); waits are not launches.
_COLLECTIVE_PREFIXES = ("c10d::",)
_NOT_LAUNCHES = ("wait", "barrier", "monitored_barrier")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/collectives.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up step)")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--json", type=Path, default=None, help="write the counts here")
    return parser


def _adapt(method: str, args: argparse.Namespace):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size + 44,
        num_hidden_layers=args.num_layers,
        num_attention_heads=4,
        vocab_size=512,
        max_position_embeddings=16,
    )
    base = LlamaForCausalLM(config)
    adapter = MonteCLoRAConfig(r=args.rank, lora_alpha=2 * args.rank, seed=0)
    if method == "lora":
        return get_peft_model(base, lora_config(adapter)), lambda model: 0.0
    return get_monteclora_model(base, adapter), lambda model: monteclora_losses(model)["total"]


def _count(rank: int, method: str, args: argparse.Namespace, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=WORLD_SIZE)
    try:
        model, regulariser = _adapt(method, args)
        model.to(device)
        mesh = init_device_mesh(device.type, (WORLD_SIZE,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(number: int) -> None:
            ids = torch.randint(512, (1, 16), generator=torch.Generator().manual_seed(number)).to(device)
            (model(input_ids=ids, labels=ids).loss + regulariser(model)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step(0)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for number in range(1, 1 + args.steps):
                step(number)
        counts = collections.Counter(
            event.name
            for event in profiler.events()
            if event.name.startswith(_COLLECTIVE_PREFIXES) and not any(word in event.name for word in _NOT_LAUNCHES)
        )
        if rank == 0:
            atomic_write_json(out, {name: count / args.steps for name, count in sorted(counts.items())})
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("num_layers", "hidden_size", "rank", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.backend == "nccl" and torch.cuda.device_count() < WORLD_SIZE:
        raise UserError(f"--backend nccl: needs {WORLD_SIZE} CUDA devices, found {torch.cuda.device_count()}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="monte-ds-collectives-") as tmp:
        for method in METHODS:
            out = Path(tmp) / f"{method}.json"
            mp.spawn(_count, args=(method, args, _free_port(), out), nprocs=WORLD_SIZE, join=True)
            results[method] = json.loads(out.read_text())
    totals = {method: sum(counts.values()) for method, counts in results.items()}
    extra = totals["monte-ds"] - totals["lora"]
    adapted = 7 * args.num_layers
    for method, counts in results.items():
        print(
            f"{method:<9} {totals[method]:>6.1f} collectives/step  "
            + ", ".join(f"{k} {v:g}" for k, v in counts.items())
        )
    print(
        f"monte-ds - lora: {extra:+.1f} collectives per step ({extra / adapted:+.3f} per adapted layer, {adapted} layers)"
    )
    if args.json is not None:
        atomic_write_json(
            args.json,
            {
                "settings": {k: v for k, v in vars(args).items() if k != "json"},
                "per_step": results,
                "totals": totals,
                "extra_per_step": extra,
                "adapted_layers": adapted,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

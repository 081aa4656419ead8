"""One overhead measurement: one method, one fresh process.

`benchmarks/overhead.py` starts this script once per (round, method), so that no method
inherits another's allocator state, threads, noise buffers or memory high-water mark. It
loads the saved base model, adapts it, times training steps (forward, backward, AdamW step)
and writes what it measured as JSON.

    python benchmarks/overhead_worker.py SETTINGS.json METHOD RESULT.json
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch.profiler import DeviceType, ProfilerActivity, profile, record_function
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from monte_ds import MonteCLoRAConfig, get_monteclora_model, monteclora_layers, monteclora_losses
from monte_ds.atomic import atomic_write_json
from monte_ds.monteclora.model import lora_config


LORA = "lora"
MONTE_DS = "monte-ds"
PEFT_MONTECLORA = "peft-monteclora"
METHODS = (LORA, MONTE_DS, PEFT_MONTECLORA)
OPTIMIZERS = ("fused", "foreach", "forloop", "paged_adamw_32bit")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Linux: writing 5 to clear_refs resets VmHWM, the RSS high-water mark (proc(5)).
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class RunSettings:
    """Everything a worker needs; the same for every method of one benchmark run."""

    checkpoint: str
    device: str
    dtype: str
    load_in_4bit: bool
    gradient_checkpointing: bool
    sampler: str
    rank: int
    lora_alpha: float
    batch_size: int
    seq_len: int
    vocab_size: int
    warmup_steps: int
    steps: int
    seed: int
    threads: int | None
    optimizer: str = "fused"
    compile: str | None = None

    def save(self, path: Path) -> None:
        atomic_write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> RunSettings:
        return cls(**json.loads(Path(path).read_text()))


def load_base(settings: RunSettings) -> LlamaForCausalLM:
    """The saved base, on the benchmark device, in its dtype or as a bitsandbytes nf4 base."""
    dtype = DTYPES[settings.dtype]
    quantization = None
    if settings.load_in_4bit:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    # disable_mmap: the weights are read into process memory, as in a real run, instead of
    # file pages that the kernel can evict mid-measurement and that make RSS jitter.
    model = LlamaForCausalLM.from_pretrained(
        settings.checkpoint,
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": settings.device},
        disable_mmap=True,
    )
    model.config.use_cache = False
    if settings.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def monte_ds_config(settings: RunSettings) -> MonteCLoRAConfig:
    """monte-ds defaults on LLaMA's 7 projections; (a) and (c) use the same LoRA underneath."""
    return MonteCLoRAConfig(
        r=settings.rank, lora_alpha=settings.lora_alpha, sampler=settings.sampler, seed=settings.seed
    )


def adapt(
    model: LlamaForCausalLM, method: str, settings: RunSettings
) -> tuple[PeftModel, Callable[[], torch.Tensor | float]]:
    """Wrap the base for `method`; returns the model and the regulariser its trainer adds to the loss."""
    torch.manual_seed(settings.seed)  # same A init for (a) and (c); monte-ds draws its own from (seed, layer)
    config = monte_ds_config(settings)
    if method == LORA:
        return get_peft_model(model, lora_config(config)), lambda: 0.0
    if method == MONTE_DS:
        peft_model = get_monteclora_model(model, config)
        return peft_model, lambda: monteclora_losses(peft_model)["total"]
    if method == PEFT_MONTECLORA:
        from peft import MontecloraConfig  # peft >= 0.20

        peft_config = dataclasses.replace(lora_config(config), monteclora_config=MontecloraConfig())
        peft_model = get_peft_model(model, peft_config)
        return peft_model, peft_model.base_model._get_monteclora_loss
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def sampled_layer_count(model: PeftModel) -> int:
    """Adapted layers whose A is actually sampled (peft 0.21's MonteCLoRA samples none on a
    bitsandbytes base: it then runs as plain LoRA, and the table must say so)."""
    monte_ds_layers = sum(1 for _ in monteclora_layers(model))
    peft_layers = sum(
        1 for m in model.modules() if isinstance(m, LoraLayer) and getattr(m, "lora_monteclora_sampler", None)
    )
    return monte_ds_layers + peft_layers


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in {_STATUS}")


class PeakMemory:
    """Peak memory of the training phase: CUDA `max_memory_allocated`, or the process RSS
    high-water mark on CPU (reset after the model is built where Linux allows it, else the
    whole process's `ru_maxrss`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.metric = "cuda_max_memory_allocated"
        elif _CLEAR_REFS.exists() and _STATUS.exists():
            self.metric = "rss_high_water_mark_since_build"
        else:
            self.metric = "ru_maxrss_whole_process"

    def current(self) -> int:
        if self.metric == "cuda_max_memory_allocated":
            return torch.cuda.memory_allocated(self.device)
        if self.metric == "rss_high_water_mark_since_build":
            return _status_bytes("VmRSS")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def reset(self) -> None:
        if self.metric == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.metric == "rss_high_water_mark_since_build":
            _CLEAR_REFS.write_text("5")

    def peak(self) -> int:
        if self.metric == "cuda_max_memory_allocated":
            return torch.cuda.max_memory_allocated(self.device)
        if self.metric == "rss_high_water_mark_since_build":
            return _status_bytes("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_optimizer(params: list[torch.nn.Parameter], name: str) -> torch.optim.Optimizer:
    """AdamW as each training setup runs it. fused: one multi-tensor update, as a GPU run with
    optim="adamw_torch_fused" does (the CPU kernel still loops per tensor for the step counters:
    see docs/performance.md); foreach: torch's default on CUDA (optim="adamw_torch"); forloop: one
    update per tensor; paged_adamw_32bit: bitsandbytes' (the QLoRA config's), a Python loop."""
    if name == "paged_adamw_32bit":
        import bitsandbytes

        return bitsandbytes.optim.PagedAdamW32bit(params, lr=1e-4)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}
    return torch.optim.AdamW(params, lr=1e-4, **flags[name])


def training_step(
    model: PeftModel,
    regulariser: Callable[[], torch.Tensor | float],
    optimizer: torch.optim.Optimizer,
    settings: RunSettings,
) -> Callable[[int], None]:
    """One training step (forward, regulariser, backward, AdamW step) on batch number `step`."""
    device = torch.device(settings.device)

    def step(number: int) -> None:
        generator = torch.Generator().manual_seed(settings.seed + number)
        batch = torch.randint(settings.vocab_size, (settings.batch_size, settings.seq_len), generator=generator)
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch).loss + regulariser()
        loss.backward()
        with record_function(OPTIMIZER_RANGE):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def train_step_seconds(step: Callable[[int], None], settings: RunSettings) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of each measured step; warm-up steps are dropped. CPU seconds
    (all threads of this process) barely move when other processes share the cores, wall seconds
    do: the pair tells contention from cost."""
    device = torch.device(settings.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wall, cpu = [], []
    for number in range(settings.warmup_steps + settings.steps):
        synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(number)
        synchronize()
        if number >= settings.warmup_steps:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    return wall, cpu


# Ops that only make a tensor's metadata (views, detach) or read a CPU scalar: no kernel launch.
METADATA_OPS = frozenset({
    "aten::as_strided", "aten::select", "aten::slice", "aten::narrow", "aten::view", "aten::unsqueeze",
    "aten::squeeze", "aten::expand", "aten::detach", "aten::alias", "aten::unbind", "aten::split",
    "aten::t", "aten::transpose", "aten::permute", "aten::_reshape_alias", "aten::view_as", "aten::lift_fresh",
    "aten::item", "aten::_local_scalar_dense", "aten::resolve_conj", "aten::resolve_neg", "aten::result_type",
})  # fmt: skip
OPTIMIZER_RANGE = "monte_ds.benchmark.optimizer_step"


def _under(event, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def ops_per_step(step: Callable[[int], None], settings: RunSettings, steps: int = 2) -> dict[str, float]:
    """Per training step, from torch.profiler: every aten op (nested ones included: the host-side
    work a GPU launch pays for), those that are not metadata-only (the launch proxy), the share of
    the optimizer step, and on CUDA the device kernels. Runs after the timed steps, so the
    profiler's own overhead never enters a step time."""
    activities = [ProfilerActivity.CPU]
    cuda = settings.device.startswith("cuda")
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    first = settings.warmup_steps + settings.steps
    with profile(activities=activities) as profiler:
        for number in range(first, first + steps):
            step(number)
        if cuda:
            torch.cuda.synchronize()
    aten = [e for e in profiler.events() if e.name.startswith("aten::")]
    counts = {
        "aten_ops_per_step": len(aten) / steps,
        "launching_aten_ops_per_step": sum(1 for e in aten if e.name not in METADATA_OPS) / steps,
        "optimizer_aten_ops_per_step": sum(1 for e in aten if _under(e, OPTIMIZER_RANGE)) / steps,
    }
    if cuda:
        counts["cuda_kernels_per_step"] = sum(1 for e in profiler.events() if e.device_type == DeviceType.CUDA) / steps
    return counts


def run(settings: RunSettings, method: str) -> dict:
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    memory = PeakMemory(device)
    model, regulariser = adapt(load_base(settings), method, settings)
    memory_after_build = memory.current()
    memory.reset()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], settings.optimizer)
    model.train()
    forward = model if settings.compile is None else torch.compile(model, backend=settings.compile)
    step = training_step(forward, regulariser, optimizer, settings)
    wall, cpu = train_step_seconds(step, settings)
    peak = memory.peak()
    return {
        **ops_per_step(step, settings),
        "method": method,
        "step_seconds": wall,
        "step_cpu_seconds": cpu,
        "peak_memory_bytes": peak,
        "memory_after_build_bytes": memory_after_build,
        "memory_metric": memory.metric,
        "adapted_layers": sum(1 for m in model.modules() if isinstance(m, LoraLayer)),
        "sampled_layers": sampled_layer_count(model),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str]) -> int:
    settings_path, method, result_path = argv
    atomic_write_json(result_path, run(RunSettings.load(Path(settings_path)), method))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What MonteCLoRA needs to know about the process group and sharded parameters: this process's
data-parallel rank, whole views of parameters that DeepSpeed ZeRO-3 or FSDP2 shard, and which
parameters ZeRO reduces as their gradient arrives. Plain tensors and single processes pass through."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial


def data_parallel_rank() -> int:
    """The global rank of this process (each data-parallel rank draws its own noise)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_zero3(param: torch.Tensor) -> bool:
    """A parameter DeepSpeed ZeRO-3 partitions (`zero.Init` or the engine converted it)."""
    return hasattr(param, "ds_status")


def full_fp32(param: torch.Tensor) -> torch.Tensor:
    """The whole fp32 tensor of a parameter. FSDP2 keeps it sharded outside its block's forward:
    a differentiable all-gather whose gradient is averaged over ranks, as FSDP does for the task
    loss (each rank's regulariser differs, through its own noise). Plain tensors pass through."""
    if isinstance(param, DTensor):
        param = param.full_tensor(grad_placements=[Partial("avg")])
    return param if param.dtype == torch.float32 else param.float()


def gather_zero3(params: Sequence[torch.Tensor], owner: torch.nn.Module | None = None) -> None:
    """Make ZeRO-3 partitioned v and alpha whole on this rank (collective: every rank runs the
    same forwards) and, given `owner`, keep them whole until `owner`'s backward has ended.

    The step node is built in the root module's pre-hook, so its backward runs after every
    layer's. ZeRO-3 releases a module's parameters at that module's end of backward while it
    records its trace (the first step, after a resume, whenever the module order changes) and
    whenever they exceed `stage3_param_persistence_threshold`: v and alpha must therefore be
    external parameters of the root, or the node's gradients land on released partitions."""
    if not params or not is_zero3(params[0]):
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus, register_external_parameter

    if owner is not None:
        for param in params:
            register_external_parameter(owner, param)
    released = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if released:
        released[0].all_gather(param_list=released)


def reduces_once(param: torch.Tensor) -> bool:
    """DeepSpeed ZeRO's parameters, whose gradient its hook reduces as it arrives, once per backward.
    DeepSpeed marks them: ZeRO-3 with `ds_status`, ZeRO-1/2 (and its bf16 optimizer) with `_hp_mapping`."""
    return is_zero3(param) or hasattr(param, "_hp_mapping")


def gathered(model: nn.Module) -> AbstractContextManager:
    """Gather ZeRO-3 partitioned parameters for reading (a no-op elsewhere)."""
    params = [p for p in model.parameters() if is_zero3(p)]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

"""The batched MonteCLoRA step: everything a forward needs that does not depend on activations,
for all layers of one adapter at once.

On a GPU the cost of MonteCLoRA is the number of ops (each a kernel launch with host-side
dispatch), not their arithmetic. So once per training forward, before the first layer runs, the
engine draws the noise of every layer (one batched Bartlett draw per shape group), the mixture
weights of every layer (one batched Dirichlet draw), the row scales eps * ||pi|| * sqrt(v) of
every layer (one custom autograd node over the stacked v and alpha) and the whole regulariser
(vectorised over layers). Each layer's forward is then `A + scale * noise` and its linear.

The row-scale node keeps what its backward needs as plain attributes rather than saved tensors,
and returns no gradient for layers that sent none: reentrant activation checkpointing replays a
block's layers in their own backward passes, each of which reaches this node with the gradients
of that block's layers only, so the node is traversed once per block and must stay valid.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial
from torch.distributions.dirichlet import _Dirichlet_backward

from monte_ds.config import MonteCLoRAConfig
from monte_ds.monteclora.math import (
    STREAM_DIRICHLET,
    STREAM_PREDICTIVE,
    STREAM_PREDICTIVE_DIRICHLET,
    STREAM_TRAIN,
    BartlettDraw,
    cooperative_loss,
    dirichlet_sample,
    kl_dirichlet,
    kl_gaussian,
    kl_wishart,
    seeded_generator,
    stream_seed,
)
from monte_ds.monteclora.sampler import NoiseGroup, NoiseSampler, data_parallel_rank

if TYPE_CHECKING:
    from monte_ds.monteclora.layer import MonteCLoRALinearA

REGULARISER_TERMS = ("kl_gaussian", "kl_wishart", "kl_dirichlet", "cooperative")
# The mixture weights of a forward come from their own stream, paired with the noise stream.
_MIXTURE_STREAM = {STREAM_TRAIN: STREAM_DIRICHLET, STREAM_PREDICTIVE: STREAM_PREDICTIVE_DIRICHLET}


def adapter_key(adapter_name: str) -> int:
    """The adapter's part of every stream key: two adapters with one seed draw different noise."""
    return zlib.crc32(adapter_name.encode())


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
    if not params or not hasattr(params[0], "ds_status"):
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus, register_external_parameter

    if owner is not None:
        for param in params:
            register_external_parameter(owner, param)
    released = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if released:
        released[0].all_gather(param_list=released)


@dataclass
class _Partition:
    """Layers in stacked order (their noise groups one after the other), with the row layout
    that stacks their (r_l,) vectors into one (L, r_max) tensor."""

    ranks: list[int]
    dof_values: list[float]
    dof: torch.Tensor  # (L,)
    pad_index: torch.Tensor | None  # rows of the padded (L * r_max) layout; None when all ranks are equal
    index: torch.Tensor | None = None  # as a subset: its rows in the full partition
    r_max: int = field(init=False)
    _subsets: dict[tuple[int, ...], _Partition] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.r_max = max(self.ranks)

    @classmethod
    def build(cls, ranks: list[int], dof: list[float], device: torch.device, index: list[int] | None = None) -> _Partition:
        r_max = max(ranks)
        pad_index = None
        if min(ranks) != r_max:
            pad_index = torch.tensor([slot * r_max + i for slot, rank in enumerate(ranks) for i in range(rank)], device=device)
        return cls(
            ranks,
            dof,
            torch.tensor(dof, device=device, dtype=torch.float32),
            pad_index,
            None if index is None else torch.tensor(index, device=device),
        )

    def subset(self, slots: tuple[int, ...]) -> _Partition:
        """The layout of some of the layers (cached: reentrant checkpointing asks for the same
        blocks every step, so their index tensors are built once)."""
        cached = self._subsets.get(slots)
        if cached is None:
            cached = self._subsets[slots] = _Partition.build(
                [self.ranks[i] for i in slots], [self.dof_values[i] for i in slots], self.dof.device, list(slots)
            )
        return cached

    def select(self, stacked: torch.Tensor) -> torch.Tensor:
        """The subset's rows of a tensor stacked over the full partition."""
        return stacked if self.index is None else stacked.index_select(0, self.index)

    def stack_rows(self, tensors: Sequence[torch.Tensor], fill: float) -> torch.Tensor:
        """(r_l, 1) or (r_l,) tensors, one per layer, as one (L, r_max) tensor padded with `fill`."""
        flat = torch.cat(tensors).view(-1)
        if self.pad_index is None:
            return flat.view(len(self.ranks), self.r_max)
        padded = flat.new_full((len(self.ranks) * self.r_max,), fill).index_copy(0, self.pad_index, flat)
        return padded.view(len(self.ranks), self.r_max)

    def split_rows(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        """(L, r_max, ...) back into one (r_l, ...) view per layer."""
        rows = stacked.unbind(0)
        if self.pad_index is None:
            return list(rows)
        return [row[:rank] for row, rank in zip(rows, self.ranks, strict=True)]


@dataclass
class _DevicePartition:
    """The layers of one device: one step node per forward; `groups` index the sampler's groups."""

    layers: list[MonteCLoRALinearA]
    groups: list[int]
    rows: _Partition


@dataclass
class _StepSpec:
    """What the step node needs besides the parameters (constant within one forward)."""

    partition: _Partition
    sample_scaler: float
    sparse_mixture: bool
    dirichlet_prior: float
    alpha: torch.Tensor  # (L, N) the concentrations it was drawn from, no gradient
    mixture_sample: torch.Tensor  # (L, N) Dirichlet draw, no gradient
    draws: list[BartlettDraw]  # the partition's noise groups, in stacked order
    with_regulariser: bool


class _StepNode(torch.autograd.Function):
    """One autograd node for everything of a forward that depends on v and alpha.

    Inputs: the L ln v, then the L ln alpha parameters. Outputs: one (r_l, 1) row scale
    eps * ||pi_l|| * sqrt(v_l) per layer, then (when `with_regulariser`) KL_N, KL_W, KL_D and the
    cooperative loss summed over layers. pi_l is the Dirichlet draw with torch's implicit
    reparameterisation gradient; the other gradients are the closed forms' derivatives, all
    batched over layers, so a step costs the same few ops whatever the number of layers.
    """

    @staticmethod
    def forward(ctx, spec: _StepSpec, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        partition = spec.partition
        count = len(partition.ranks)
        log_v = partition.stack_rows(params[:count], fill=0.0)  # padding: v = 1, which adds no KL
        alpha = spec.alpha
        sample = spec.mixture_sample
        sqrt_v = (0.5 * log_v).exp()
        norm = None if spec.sparse_mixture else sample.norm(dim=-1, keepdim=True)  # one-hot(argmax pi): norm 1
        scale = spec.sample_scaler * sqrt_v if norm is None else (spec.sample_scaler * norm) * sqrt_v
        outputs = partition.split_rows(scale.unsqueeze(-1))
        row_sq = None
        if spec.with_regulariser:
            row_sq = partition.stack_rows([draw.row_sq.view(-1) for draw in spec.draws], fill=1.0)
            log_det = torch.cat([draw.log_det for draw in spec.draws])
            outputs += [
                kl_gaussian(log_v, row_sq, log_det).sum(),
                kl_wishart(log_v, partition.dof).sum(),
                kl_dirichlet(alpha, spec.dirichlet_prior).sum(),
                cooperative_loss(sample).sum(),
            ]
        # Attributes, not save_for_backward: reentrant checkpointing traverses this node once per block.
        ctx.spec, ctx.scale, ctx.norm, ctx.v, ctx.alpha, ctx.row_sq = spec, scale, norm, sqrt_v.square(), alpha, row_sq
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        spec: _StepSpec = ctx.spec
        count = len(spec.partition.ranks)
        scale_grads = grads[:count]
        g_kl_n, g_kl_w, g_kl_d, g_coop = grads[count:] if spec.with_regulariser else (None,) * 4
        if any(g is not None for g in (g_kl_n, g_kl_w, g_kl_d, g_coop)):
            slots = tuple(range(count))
            rows = spec.partition
        else:  # a replayed block (reentrant checkpointing): only its layers, O(block) ops
            slots = tuple(i for i, g in enumerate(scale_grads) if g is not None)
            if not slots:
                return (None,) * (1 + 2 * count)
            rows = spec.partition if len(slots) == count else spec.partition.subset(slots)
        v, alpha, sample = rows.select(ctx.v), rows.select(ctx.alpha), rows.select(spec.mixture_sample)
        grad_log_v = torch.zeros_like(v)
        grad_sample = None
        if any(scale_grads[i] is not None for i in slots):
            zero = v.new_zeros(rows.r_max, 1)
            filled = [zero[: spec.partition.ranks[i]] if scale_grads[i] is None else scale_grads[i] for i in slots]
            weighted = rows.stack_rows(filled, fill=0.0) * rows.select(ctx.scale)  # d loss / d ln(scale)
            grad_log_v = grad_log_v + 0.5 * weighted
            if ctx.norm is not None:  # d||x||/dx = x/||x||
                grad_sample = (weighted.sum(-1, keepdim=True) / rows.select(ctx.norm).square()) * sample
        if g_kl_n is not None:
            grad_log_v = grad_log_v + g_kl_n * 0.5 * (v * ctx.row_sq - 1)
        if g_kl_w is not None:
            grad_log_v = grad_log_v + g_kl_w * 0.5 * rows.dof.unsqueeze(-1) * (v - 1)
        if g_coop is not None:
            grad_sample = 2 * g_coop * sample if grad_sample is None else grad_sample + 2 * g_coop * sample
        grad_alpha = torch.zeros_like(alpha) if grad_sample is None else _Dirichlet_backward(sample, alpha, grad_sample)
        if g_kl_d is not None:
            total = alpha.sum(-1, keepdim=True)
            prior = spec.dirichlet_prior
            kl_d_grad = (alpha - prior) * torch.polygamma(1, alpha) - torch.polygamma(1, total) * (total - alpha.shape[-1] * prior)
            grad_alpha = grad_alpha + g_kl_d * kl_d_grad
        log_v_grads: list[torch.Tensor | None] = [None] * count
        log_alpha_grads: list[torch.Tensor | None] = [None] * count
        for slot, g_v, g_a in zip(slots, rows.split_rows(grad_log_v.unsqueeze(-1)), (grad_alpha * alpha).unsqueeze(1).unbind(0), strict=True):
            log_v_grads[slot], log_alpha_grads[slot] = g_v, g_a
        return (None, *log_v_grads, *log_alpha_grads)


@dataclass
class _ForwardState:
    """One forward's per-layer scales and noise (indexed by layer), and its regulariser."""

    key: tuple[int, int]
    scales: list[torch.Tensor | None]
    noise: list[torch.Tensor | None]
    regulariser: dict[str, torch.Tensor] | None = None


class MonteCLoRAEngine:
    """One MonteCLoRA adapter: its config, its layers, its noise sampler and forward counter,
    and the batched state of the current forward."""

    def __init__(self, config: MonteCLoRAConfig, adapter_name: str = "default") -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.adapter_key = adapter_key(adapter_name)
        self.sampler = NoiseSampler(config.seed, config.sampler, self.adapter_key)
        self.layers: list[MonteCLoRALinearA] = []
        self.forward_index = 0  # index of the next training forward
        self.predictive_draw: int | None = None
        self._partitions: list[_DevicePartition] | None = None
        self._layout_device: torch.device | None = None
        self._train: _ForwardState | None = None
        self._predictive: _ForwardState | None = None

    # -- layers --------------------------------------------------------------------------------
    def register(self, layer: MonteCLoRALinearA) -> int:
        self.layers.append(layer)
        self._partitions = None
        return len(self.layers) - 1

    def _layout(self) -> list[_DevicePartition]:
        """Partitions by device and noise groups by shape; rebuilt when a layer was added or the
        model moved to another device."""
        first_device = self.layers[0].wishart_log_scale.device
        if self._partitions is not None and self._layout_device == first_device:
            return self._partitions
        self._layout_device = first_device
        by_shape: dict[tuple, list[MonteCLoRALinearA]] = {}
        for layer in self.layers:
            key = (layer.wishart_log_scale.device, layer.out_features, layer.in_features, layer.dof)
            by_shape.setdefault(key, []).append(layer)
        groups, partitions_by_device = [], {}
        for number, ((device, rank, n_in, dof), members) in enumerate(by_shape.items()):
            groups.append(NoiseGroup(rank, n_in, dof, device, len(members)))
            layers, numbers = partitions_by_device.setdefault(device, ([], []))
            layers.extend(members)
            numbers.append(number)
        self.sampler.set_groups(tuple(groups))
        self._partitions = [
            _DevicePartition(layers, numbers, _Partition.build([m.out_features for m in layers], [m.dof for m in layers], device))
            for device, (layers, numbers) in partitions_by_device.items()
        ]
        return self._partitions

    # -- forwards ------------------------------------------------------------------------------
    @property
    def current_index(self) -> int:
        """Index of the training forward in progress (or the last one)."""
        return max(self.forward_index - 1, 0)

    def begin_training_forward(self, root: torch.nn.Module | None = None) -> None:
        """Called once per training forward of the whole model (a pre-hook on `root`, the module
        whose backward ends last), never during checkpoint recomputation, which re-runs layers only."""
        self.sampler.rank = data_parallel_rank()
        index = self.forward_index
        self.forward_index += 1
        self._train = None  # the previous forward's graph is the caller's, not ours
        self._train = self._build((STREAM_TRAIN, index), with_regulariser=True, root=root)

    def begin_eval_forward(self, root: torch.nn.Module | None = None) -> None:
        """Eval forwards use the mean, or a posterior-predictive draw inside `predictive_sampling`."""
        if self.predictive_draw is None:
            return
        key = (STREAM_PREDICTIVE, self.predictive_draw)
        if self._predictive is None or self._predictive.key != key:
            self.sampler.rank = data_parallel_rank()
            self._predictive = self._build(key, with_regulariser=False, root=root)

    def weight_noise(self, layer: MonteCLoRALinearA) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(row scale, noise) of `layer` in the current forward, or None where the mean is used."""
        if layer.training:
            if self._train is None:  # a layer run outside a model forward: start a forward now
                with torch.enable_grad():
                    self.begin_training_forward()
            state = self._train
        elif self.predictive_draw is not None:
            self.begin_eval_forward()
            state = self._predictive
        else:
            return None
        return state.scales[layer.layer_index], state.noise[layer.layer_index]

    def _build(self, key: tuple[int, int], with_regulariser: bool, root: torch.nn.Module | None = None) -> _ForwardState:
        partitions = self._layout()
        stream, index = key
        draws = self.sampler.draw(key)
        count = len(self.layers)
        state = _ForwardState(key, [None] * count, [None] * count)
        sums: list[tuple[torch.Tensor, ...]] = []
        for number, partition in enumerate(partitions):
            group_draws = [draws[g] for g in partition.groups]
            gather_zero3([p for layer in partition.layers for p in (layer.wishart_log_scale, layer.concentration_log)], owner=root)
            log_v = [full_fp32(layer.wishart_log_scale) for layer in partition.layers]
            log_alpha = [full_fp32(layer.concentration_log) for layer in partition.layers]
            alpha = torch.cat(log_alpha).detach().exp()
            generator = seeded_generator(alpha.device, stream_seed(self.config.seed, self.adapter_key, self.sampler.rank, _MIXTURE_STREAM[stream], index, number))
            config = self.config
            spec = _StepSpec(partition.rows, config.sample_scaler, config.sparse_mixture, config.dirichlet_prior,
                             alpha, dirichlet_sample(alpha, generator), group_draws, with_regulariser)
            with torch.autocast(alpha.device.type, enabled=False):
                outputs = _StepNode.apply(spec, *log_v, *log_alpha)
            noise = [layer_noise for draw in group_draws for layer_noise in draw.noise.unbind(0)]
            for layer, scale, layer_noise in zip(partition.layers, outputs, noise, strict=False):
                state.scales[layer.layer_index] = scale
                state.noise[layer.layer_index] = layer_noise
            if with_regulariser:
                sums.append(tuple(value.to(partitions[0].rows.dof.device) for value in outputs[len(partition.layers):]))
        if with_regulariser:
            state.regulariser = self._regulariser(sums, count)
        return state

    def _regulariser(self, sums: list[tuple[torch.Tensor, ...]], count: int) -> dict[str, torch.Tensor]:
        """Each term averaged over all layers; total = kl_weight * mean KL + mean cooperative."""
        totals = sums[0] if len(sums) == 1 else [torch.stack(values).sum() for values in zip(*sums, strict=True)]
        terms = {name: value / count for name, value in zip(REGULARISER_TERMS, totals, strict=True)}
        kl = terms["kl_gaussian"] + terms["kl_wishart"] + terms["kl_dirichlet"]
        terms["total"] = self.config.kl_weight * kl + terms["cooperative"]
        return terms

    def regulariser(self) -> dict[str, torch.Tensor]:
        """The regulariser of the last training forward, averaged over layers (fp32, differentiable):
        total = kl_weight * mean(KL_N + KL_W + KL_D) + mean(cooperative)."""
        if self._train is None or self._train.regulariser is None:
            raise RuntimeError("monteclora_losses: no training-mode forward has run yet")
        return self._train.regulariser

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """What a checkpoint must hold for the noise of a resumed run to continue exactly."""
        return {"seed": self.config.seed, "forward_index": self.forward_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.config.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this model was built with seed {self.config.seed}")
        self.forward_index = int(state["forward_index"])
        self._train = None
        self.sampler.drop_pending()

    # -- copying: a forward's graph is not copied --------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_train=None, _predictive=None, _partitions=None)
        return state

"""The batched MonteCLoRA step: everything a forward needs that does not depend on activations,
for all layers of one adapter at once.

On a GPU the cost of MonteCLoRA is the number of ops (each a kernel launch with host-side
dispatch), not their arithmetic. So once per training forward, before the first layer runs, the
engine draws the noise of every layer (one batched Bartlett draw per shape group), the mixture
weights of every layer (one batched Dirichlet draw), the row scales eps * ||pi|| * sqrt(v) of
every layer (one custom autograd node over the adapter's stacked ln v and ln alpha: one parameter
tensor for all layers of a device, so one gradient accumulation, one optimizer tensor and, sharded,
one all-gather and one reduce-scatter per step) and the whole regulariser (vectorised over layers).
The node's outputs are each layer's weight delta `scale * noise` (one product per noise group), so
a layer's forward is `A + delta` and its linear: about seven ops per adapted layer and step
beyond LoRA's, whatever the optimizer (docs/performance.md).

The step node keeps what its backward needs as plain attributes rather than saved tensors,
and returns no gradient for layers that sent none: reentrant activation checkpointing replays a
block's layers in their own backward passes, each of which reaches this node with the gradients
of that block's layers only, so the node is traversed once per block and must stay valid.
Under DeepSpeed ZeRO, which reduces a parameter's gradient once per backward, those traversals
reach a detached copy of the stacked parameter, whose gradient `_HandOver` passes on in one piece
after every block.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable
from torch.distributions.dirichlet import _Dirichlet_backward

from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import InputError
from monte_ds.monteclora.distributed import data_parallel_rank, full_fp32, gather_zero3, reduces_once
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
from monte_ds.monteclora.sampler import NoiseGroup, NoiseSampler


if TYPE_CHECKING:
    from monte_ds.monteclora.layer import MonteCLoRALinearA

# The adapter's ln v and ln alpha for all layers of a device, one parameter held by the first layer's A.
LOG_PARAMS = "monteclora_log_params"
REGULARISER_TERMS = ("kl_gaussian", "kl_wishart", "kl_dirichlet", "cooperative")
# The mixture weights of a forward come from their own stream, paired with the noise stream.
_MIXTURE_STREAM = {STREAM_TRAIN: STREAM_DIRICHLET, STREAM_PREDICTIVE: STREAM_PREDICTIVE_DIRICHLET}


def adapter_key(adapter_name: str) -> int:
    """The adapter's part of every stream key: two adapters with one seed draw different noise."""
    return zlib.crc32(adapter_name.encode())


def stack_log_params(rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per-layer (ln v (r_l values), ln alpha (N values)), in row order, as the stacked
    L x (r_max + N) parameter's value: ln v padded with 0 (v = 1) up to r_max, then ln alpha."""
    r_max = max(log_v.numel() for log_v, _ in rows)
    return torch.stack(
        [
            torch.cat((log_v.reshape(-1), log_v.new_zeros(r_max - log_v.numel()), log_alpha.reshape(-1)))
            for log_v, log_alpha in rows
        ]
    )


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
    def build(
        cls, ranks: list[int], dof: list[float], device: torch.device, index: list[int] | None = None
    ) -> _Partition:
        r_max = max(ranks)
        pad_index = None
        if min(ranks) != r_max:
            pad_index = torch.tensor(
                [slot * r_max + i for slot, rank in enumerate(ranks) for i in range(rank)], device=device
            )
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


@dataclass
class _DevicePartition:
    """The layers of one device, in the row order of their stacked parameter (held by the first
    layer's A): one step node per forward; `groups` index the sampler's groups."""

    layers: list[MonteCLoRALinearA]
    groups: list[int]
    rows: _Partition

    @property
    def log_params(self) -> torch.Tensor:
        """(L, r_max + N): row l is layer l's ln v (padded with 0, i.e. v = 1) then its ln alpha."""
        return getattr(self.layers[0], LOG_PARAMS)


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
    dtype: torch.dtype  # the deltas': the layers' weight dtype in the last forward
    with_regulariser: bool


class _HandOver(torch.autograd.Function):
    """Under DeepSpeed ZeRO: the step node reads a detached copy of the stacked parameter (`proxy`),
    and this node, recorded just before it, hands the proxy's accumulated gradient to the parameter
    in one piece. ZeRO reduces a parameter's gradient in a hook that fires each time autograd reaches
    the parameter (even with no gradient), and cannot take a second one in the same backward; under
    reentrant activation checkpointing each block's replay is a backward of its own that reaches the
    step node. Recorded before the step node, this node runs after it and after every block; its
    output, a zero, is added to the regulariser, so it is in the loss's graph."""

    @staticmethod
    def forward(ctx, proxy: tuple[torch.Tensor], param: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # The proxy comes inside a tuple: as an input, its gradient would wait for this node's.
        (ctx.proxy,) = proxy
        return param.new_zeros(())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor | None]:  # type: ignore[override]
        proxy_grad, ctx.proxy.grad = ctx.proxy.grad, None
        return None, proxy_grad


class _StepNode(torch.autograd.Function):
    """One autograd node for everything of a forward that depends on v and alpha.

    Input: the stacked (L, r_max + N) [ln v | ln alpha]. Outputs: each layer's weight delta
    scale_l * noise_l (r_l x n_l, in its weight's dtype), scale_l = eps * ||pi_l|| * sqrt(v_l) per
    row, then (when `with_regulariser`) KL_N, KL_W, KL_D and the cooperative loss summed over
    layers. pi_l is the Dirichlet draw with torch's implicit reparameterisation gradient; the other
    gradients are the closed forms' derivatives. Everything is batched per noise group, so a step
    costs the same few ops whatever the number of layers, and a layer adds only `A + delta`.
    """

    @staticmethod
    def forward(ctx, spec: _StepSpec, log_params: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        partition = spec.partition
        log_v = log_params[:, : partition.r_max]  # padding holds 0: v = 1, which adds no KL and gets no gradient
        alpha = spec.alpha
        sample = spec.mixture_sample
        sqrt_v = (0.5 * log_v).exp()
        norm = None if spec.sparse_mixture else sample.norm(dim=-1, keepdim=True)  # one-hot(argmax pi): norm 1
        scale = spec.sample_scaler * sqrt_v if norm is None else (spec.sample_scaler * norm) * sqrt_v
        outputs: list[torch.Tensor] = []
        start = 0
        for draw in spec.draws:
            count, rank, _ = draw.noise.shape
            outputs += (scale[start : start + count, :rank].unsqueeze(-1) * draw.noise).to(spec.dtype).unbind(0)
            start += count
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
        delta_grads = grads[:count]
        g_kl_n, g_kl_w, g_kl_d, g_coop = grads[count:] if spec.with_regulariser else (None,) * 4
        if any(g is not None for g in (g_kl_n, g_kl_w, g_kl_d, g_coop)):
            slots = tuple(range(count))
            rows = spec.partition
        else:  # a replayed block (reentrant checkpointing): only its layers, O(block) ops
            slots = tuple(i for i, g in enumerate(delta_grads) if g is not None)
            if not slots:
                return None, None
            rows = spec.partition if len(slots) == count else spec.partition.subset(slots)
        v, alpha, sample = rows.select(ctx.v), rows.select(ctx.alpha), rows.select(spec.mixture_sample)
        grad_log_v = torch.zeros_like(v)
        grad_sample = None
        grad_scale = _scale_gradient(spec, delta_grads, slots)
        if grad_scale is not None:
            weighted = grad_scale * rows.select(ctx.scale)  # d loss / d ln(scale)
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
            kl_d_grad = (alpha - prior) * torch.polygamma(1, alpha) - torch.polygamma(1, total) * (
                total - alpha.shape[-1] * prior
            )
            grad_alpha = grad_alpha + g_kl_d * kl_d_grad
        grad = torch.cat((grad_log_v, grad_alpha * alpha), dim=-1)
        if rows.index is not None:  # a block's rows into the whole stack
            grad = grad.new_zeros(count, grad.shape[-1]).index_copy_(0, rows.index, grad)
        return None, grad


def _scale_gradient(
    spec: _StepSpec, delta_grads: Sequence[torch.Tensor | None], slots: tuple[int, ...]
) -> torch.Tensor | None:
    """d loss / d scale for the rows `slots` (len(slots), r_max), from the deltas' gradients:
    sum over columns of grad * noise, one batched product per noise group; None without any."""
    if all(delta_grads[i] is None for i in slots):
        return None
    r_max = spec.partition.r_max
    parts, start, wanted = [], 0, set(slots)
    for draw in spec.draws:
        count, rank, n_in = draw.noise.shape
        members = [i for i in range(start, start + count) if i in wanted]
        present = [delta_grads[i] for i in members if delta_grads[i] is not None]
        if present:
            zero = present[0].new_zeros(rank, n_in) if len(present) < len(members) else None
            grads = torch.stack([zero if delta_grads[i] is None else delta_grads[i] for i in members]).float()
            noise = (
                draw.noise
                if len(members) == count
                else draw.noise[torch.tensor(members, device=draw.noise.device) - start]
            )
            part = (grads * noise).sum(-1)
            parts.append(part if rank == r_max else torch.nn.functional.pad(part, (0, r_max - rank)))
        elif members:  # a group none of whose layers was used in this forward
            parts.append(draw.noise.new_zeros(len(members), r_max))
        start += count
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class _ForwardState:
    """One forward's per-layer weight deltas (indexed by layer), its regulariser, and (under ZeRO)
    the detached copies of the stacked parameters that its step nodes read."""

    key: tuple[int, int]
    deltas: list[torch.Tensor | None]
    regulariser: dict[str, torch.Tensor] | None = None
    proxies: list[torch.Tensor] = field(default_factory=list)


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
        self._stacks: list[list[int]] = []  # per stacked parameter: its layers' indices, in row order
        self._rows: dict[int, tuple[int, int]] = {}  # layer index -> (stack, row)
        # Per partition: the dtype its layers' weights had in a forward. Learnt from the layers, not
        # read from them in the root's pre-hook, where a ZeRO-3 weight read would be fetched (and
        # registered with the root) and an FSDP2 one would still be the sharded fp32 master.
        self._delta_dtypes: dict[int, torch.dtype] = {}
        self._partitions: list[_DevicePartition] | None = None
        self._layout_device: tuple[torch.device, ...] | None = None
        self._train: _ForwardState | None = None
        self._predictive: _ForwardState | None = None

    # -- layers and their stacked parameters -------------------------------------------------
    def register(self, layer: MonteCLoRALinearA) -> int:
        if self._stacks:
            raise RuntimeError("MonteCLoRA: a layer was added after the adapter's parameters were stacked")
        self.layers.append(layer)
        return len(self.layers) - 1

    def stack_parameters(self) -> None:
        """Make the registered layers' initial ln v and ln alpha one parameter per device, held by
        that device's first layer; called once, after the last layer is registered.

        Rows are grouped by noise shape (the order of the batched draws), so a forward's rows are
        the stacked parameter itself and the step node needs no per-layer gather."""
        by_shape: dict[tuple, list[int]] = {}
        for layer in self.layers:
            by_shape.setdefault((layer.weight.device, *self._noise_shape(layer)), []).append(layer.layer_index)
        by_device: dict[torch.device, list[int]] = {}
        for (device, *_), members in by_shape.items():
            by_device.setdefault(device, []).extend(members)
        for device, members in by_device.items():
            layers = [self.layers[i] for i in members]
            stacked = stack_log_params([layer.initial_log_params for layer in layers])
            for layer in layers:
                layer.initial_log_params = None
            layers[0].register_parameter(LOG_PARAMS, torch.nn.Parameter(stacked.to(device)))
            for slot, index in enumerate(members):
                self._rows[index] = (len(self._stacks), slot)
            self._stacks.append(members)

    @staticmethod
    def _noise_shape(layer: MonteCLoRALinearA) -> tuple[int, int, float]:
        return layer.out_features, layer.in_features, layer.dof

    def stacked_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's trainable ln v / ln alpha tensors: one per device (usually one)."""
        return [getattr(self.layers[members[0]], LOG_PARAMS) for members in self._stacks]

    def row_of(self, layer: MonteCLoRALinearA) -> tuple[int, int]:
        """(stacked parameter, row) of `layer`."""
        return self._rows[layer.layer_index]

    def log_params_row(self, layer: MonteCLoRALinearA, full: bool = False) -> torch.Tensor:
        """`layer`'s row of its stacked [ln v (padded with 0) | ln alpha]: a view of the parameter,
        or (`full`) of its whole fp32 value where ZeRO-3 or FSDP2 shard it (collective)."""
        stack, slot = self.row_of(layer)
        stacked = self.stacked_parameters()[stack]
        if full:
            gather_zero3([stacked])
            stacked = full_fp32(stacked)
        return stacked[slot]

    def note_weight_dtype(self, layer: MonteCLoRALinearA, dtype: torch.dtype) -> None:
        """`layer` had to cast its delta to `dtype`: the next forward computes its partition's deltas
        in it (one cast per noise group instead of one per layer and step)."""
        self._delta_dtypes[self.row_of(layer)[0]] = dtype

    def _layout(self) -> list[_DevicePartition]:
        """One partition per stacked parameter, its noise groups by shape; rebuilt when the model
        moved to another device."""
        params = self.stacked_parameters()
        devices = tuple(param.device for param in params)
        if self._partitions is not None and self._layout_device == devices:
            return self._partitions
        self._layout_device = devices
        groups: list[NoiseGroup] = []
        self._partitions = []
        for members, device in zip(self._stacks, devices, strict=True):
            layers = [self.layers[i] for i in members]
            by_shape: dict[tuple, int] = {}
            for layer in layers:
                shape = self._noise_shape(layer)
                by_shape[shape] = by_shape.get(shape, 0) + 1
            numbers = list(range(len(groups), len(groups) + len(by_shape)))
            groups += [NoiseGroup(rank, n_in, dof, device, count) for (rank, n_in, dof), count in by_shape.items()]
            rows = _Partition.build([m.out_features for m in layers], [m.dof for m in layers], device)
            self._partitions.append(_DevicePartition(layers, numbers, rows))
        self.sampler.set_groups(tuple(groups))
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
        if self._train is not None and any(proxy.grad is not None for proxy in self._train.proxies):
            raise RuntimeError(
                "MonteCLoRA under DeepSpeed ZeRO hands v and alpha their gradient through the regulariser: add "
                "monteclora_losses(model)['total'] to the loss"
            )
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

    def weight_delta(self, layer: MonteCLoRALinearA) -> torch.Tensor | None:
        """`layer`'s sampled weight minus its mean in the current forward (scale * noise), or None
        where the mean is used."""
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
        return state.deltas[layer.layer_index]

    def _build(
        self, key: tuple[int, int], with_regulariser: bool, root: torch.nn.Module | None = None
    ) -> _ForwardState:
        partitions = self._layout()
        stream, index = key
        draws = self.sampler.draw(key)
        count = len(self.layers)
        state = _ForwardState(key, [None] * count)
        sums: list[tuple[torch.Tensor, ...]] = []
        for number, partition in enumerate(partitions):
            group_draws = [draws[g] for g in partition.groups]
            stacked = partition.log_params
            gather_zero3([stacked], owner=root)
            log_params = full_fp32(stacked)
            alpha = log_params[:, partition.rows.r_max :].detach().exp()
            generator = seeded_generator(
                alpha.device,
                stream_seed(
                    self.config.seed, self.adapter_key, self.sampler.rank, _MIXTURE_STREAM[stream], index, number
                ),
            )
            config = self.config
            spec = _StepSpec(
                partition.rows,
                config.sample_scaler,
                config.sparse_mixture,
                config.dirichlet_prior,
                alpha,
                dirichlet_sample(alpha, generator),
                group_draws,
                self._delta_dtypes.get(number, torch.float32),
                with_regulariser,
            )
            with torch.autocast(alpha.device.type, enabled=False):
                if with_regulariser and reduces_once(stacked):
                    proxy = log_params.detach().requires_grad_()
                    state.proxies.append(proxy)
                    hand_over = _HandOver.apply((proxy,), log_params)
                    outputs = list(_StepNode.apply(spec, proxy))
                    first_term = len(partition.layers)
                    outputs[first_term] = outputs[first_term] + hand_over
                else:
                    outputs = _StepNode.apply(spec, log_params)
            for layer, delta in zip(partition.layers, outputs, strict=False):
                state.deltas[layer.layer_index] = delta
            if with_regulariser:
                sums.append(
                    tuple(value.to(partitions[0].rows.dof.device) for value in outputs[len(partition.layers) :])
                )
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
            raise InputError(
                f"sampler state has seed {state['seed']}, this model was built with seed {self.config.seed}"
            )
        self.forward_index = int(state["forward_index"])
        self._train = None
        self.sampler.drop_pending()

    # -- copying: a forward's graph is not copied --------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_train=None, _predictive=None, _partitions=None)
        return state

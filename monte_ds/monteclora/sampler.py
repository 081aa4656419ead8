"""Per-rank noise source: draws the parameter-free part of MonteCLoRA's noise ahead of time.

Every draw is a pure function of (seed, rank, stream, forward index, layer index), so the
synchronous and asynchronous modes, gradient-checkpoint recomputation and a resumed run all
see identical noise. The asynchronous mode only changes *when* a draw is computed:

- CPU: one background thread computes the next `prefetch_layers` draws while the current
  layer runs (torch ops release the GIL).
- CUDA: draws are enqueued on a side stream; the compute stream waits on an event before it
  reads a draw, and `record_stream` keeps the allocator from reusing it too early.

Memory bound: at most `prefetch_layers` pending draws (each `r x n_in` fp32 plus O(r)) exist
ahead of the layer being computed, whatever the number of layers: prefetching follows the
forward order, layer l+1 (then the next forward's layer 0) while layer l computes. A
prediction that misses (recomputation in backward runs in reverse) is drawn synchronously,
and stale draws of older forwards are dropped.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from monte_ds.config import MonteCLoRAConfig
from monte_ds.monteclora.math import STREAM_TRAIN, BartlettDraw, draw_bartlett, seeded_generator, stream_seed

DrawKey = tuple[int, int, int]  # (stream, forward index, layer index)


@dataclass(frozen=True)
class LayerShape:
    rank: int
    n_in: int
    dof: float


def data_parallel_rank() -> int:
    """The global rank of this process (each data-parallel rank draws its own noise)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class NoiseSource:
    """Shared by all MonteCLoRA layers of one model; holds the training-forward counter."""

    def __init__(self, config: MonteCLoRAConfig) -> None:
        self.config = config
        self.seed = config.seed
        self.mode = config.sampler
        self.prefetch_layers = config.prefetch_layers
        self.forward_index = 0  # index of the next training forward
        self.current_index = 0  # index of the training forward in progress (or the last one)
        self.rank = data_parallel_rank()
        self.predictive_draw: int | None = None
        self._shapes: list[LayerShape] = []
        self._devices: dict[int, torch.device] = {}
        self._pending: dict[DrawKey, Any] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._side_streams: dict[torch.device, Any] = {}

    # -- registration and the counter ------------------------------------------------------
    @property
    def layer_count(self) -> int:
        return len(self._shapes)

    def register(self, shape: LayerShape) -> int:
        self._shapes.append(shape)
        return len(self._shapes) - 1

    def begin_training_forward(self) -> None:
        """Called once per training forward of the whole model (a pre-hook on the root module),
        never during checkpoint recomputation, which re-runs layers only."""
        self.rank = data_parallel_rank()
        self.current_index = self.forward_index
        self.forward_index += 1
        with self._lock:
            stale = [k for k in self._pending if k[0] == STREAM_TRAIN and k[1] < self.current_index]
            for key in stale:
                self._pending.pop(key)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "forward_index": self.forward_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this model was built with seed {self.seed}")
        self.forward_index = int(state["forward_index"])
        self.current_index = max(self.forward_index - 1, 0)
        with self._lock:
            self._pending.clear()

    # -- drawing -----------------------------------------------------------------------------
    def key_seed(self, stream: int, index: int, layer: int) -> int:
        return stream_seed(self.seed, self.rank, stream, index, layer)

    def _compute(self, key: DrawKey, device: torch.device) -> BartlettDraw:
        stream, index, layer = key
        shape = self._shapes[layer]
        generator = seeded_generator(device, self.key_seed(stream, index, layer))
        return draw_bartlett(shape.rank, shape.n_in, shape.dof, generator, device)

    def take(self, key: DrawKey, device: torch.device) -> BartlettDraw:
        """The draw for `key`, prefetched if it was predicted, else computed now."""
        self._devices[key[2]] = device
        with self._lock:
            pending = self._pending.pop(key, None)
        if pending is None:
            draw = self._compute(key, device)
        elif device.type == "cuda":
            draw, event = pending
            current = torch.cuda.current_stream(device)
            current.wait_event(event)
            for tensor in (draw.noise, draw.row_sq, draw.log_det):
                tensor.record_stream(current)
        else:
            draw = pending.result()
        if self.mode == "async" and key[0] == STREAM_TRAIN:
            self._prefetch_after(key)
        return draw

    def _prefetch_after(self, key: DrawKey) -> None:
        stream, index, layer = key
        for _ in range(self.prefetch_layers):
            layer += 1
            if layer == len(self._shapes):
                index, layer = index + 1, 0
            device = self._devices.get(layer)
            if device is None:
                return  # not seen yet: its device is unknown until its first forward
            nxt = (stream, index, layer)
            with self._lock:
                if nxt in self._pending or len(self._pending) >= self.prefetch_layers:
                    continue
                self._pending[nxt] = self._launch(nxt, device)

    def _launch(self, key: DrawKey, device: torch.device) -> Any:
        if device.type == "cuda":
            side = self._side_streams.get(device)
            if side is None:
                side = self._side_streams[device] = torch.cuda.Stream(device)
            with torch.cuda.stream(side):
                draw = self._compute(key, device)
                event = torch.cuda.Event()
                event.record(side)
            return draw, event
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monteclora-noise")
        future: Future = self._executor.submit(self._compute, key, device)
        return future

    # -- copying: threads, streams and pending draws are not copied ----------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pending={}, _lock=None, _executor=None, _side_streams={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

"""Per-rank noise sampler: the parameter-free part of one forward's noise, for all layers at once.

Layers with the same noise shape form a `NoiseGroup`; each group's noise for one forward is one
batched Bartlett draw (`math.draw_bartlett`), from a generator seeded by (seed, adapter, rank,
stream, forward index, group). So the synchronous and asynchronous modes, checkpoint recomputation and
a resumed run all see identical noise, and a step costs a handful of ops whatever the number of
layers. The asynchronous mode only changes *when* the next training forward's draws are computed:

- CUDA: enqueued on a side stream right after the current forward's draws are taken; the
  compute stream waits on an event before it reads them, and `record_stream` keeps the
  allocator from reusing them too early.
- CPU: on one background thread (torch ops release the GIL).

`"auto"` (the default) picks per device what measures faster (docs/performance.md): the side
stream on CUDA; on CPU the in-step draw, because a background thread's OpenMP team competes with
the compute threads for the same cores.

Memory: the current forward's noise (one `r x n_in` fp32 matrix per layer, which autograd keeps
until the backward, as LoRA keeps its activations) plus, in asynchronous mode, the next one's.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from monte_ds.monteclora.distributed import data_parallel_rank
from monte_ds.monteclora.math import STREAM_TRAIN, BartlettDraw, draw_bartlett, seeded_generator, stream_seed


DrawKey = tuple[int, int]  # (stream, forward index)


@dataclass(frozen=True)
class NoiseGroup:
    """`count` layers whose noise is `rank x n_in` with Wishart dof `dof`, on `device`."""

    rank: int
    n_in: int
    dof: float
    device: torch.device
    count: int


def resolve_mode(mode: str, device: torch.device) -> str:
    """`auto` is async (side stream) on CUDA and sync on CPU: what measures faster on each."""
    if mode != "auto":
        return mode
    return "async" if device.type == "cuda" else "sync"


class NoiseSampler:
    """Draws the noise of every group for a (stream, forward index); prefetches the next
    training forward's draws in asynchronous mode."""

    def __init__(self, seed: int, mode: str, adapter_key: int) -> None:
        self.seed = seed
        self.adapter_key = adapter_key
        self.mode = mode
        self.rank = data_parallel_rank()
        self._groups: tuple[NoiseGroup, ...] = ()
        self._pending: dict[DrawKey, Any] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._side_streams: dict[torch.device, Any] = {}

    def set_groups(self, groups: tuple[NoiseGroup, ...]) -> None:
        if groups != self._groups:
            self._groups = groups
            self.drop_pending()

    def drop_pending(self) -> None:
        with self._lock:
            self._pending.clear()

    def draw(self, key: DrawKey) -> list[BartlettDraw]:
        """One batched draw per group for `key`: prefetched if it was predicted, else computed now."""
        with self._lock:
            pending = self._pending.pop(key, None)
            stale = [k for k in self._pending if k[0] == key[0] and k[1] < key[1]]
            for old in stale:
                self._pending.pop(old)
        if pending is None:
            draws = self._compute(key)
        elif isinstance(pending, Future):
            draws = pending.result()
        else:
            draws = self._wait_for_side_stream(*pending)
        if key[0] == STREAM_TRAIN and self.prefetches:
            self._prefetch((key[0], key[1] + 1))
        return draws

    @property
    def prefetches(self) -> bool:
        """Asynchronous mode, on one device (a model split over devices draws in-step)."""
        devices = {group.device for group in self._groups}
        return len(devices) == 1 and resolve_mode(self.mode, next(iter(devices))) == "async"

    def _compute(self, key: DrawKey) -> list[BartlettDraw]:
        stream, index = key
        draws = []
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            for number, group in enumerate(self._groups):
                generator = seeded_generator(
                    group.device, stream_seed(self.seed, self.adapter_key, self.rank, stream, index, number)
                )
                draws.append(draw_bartlett(group.count, group.rank, group.n_in, group.dof, generator, group.device))
        return draws

    def _prefetch(self, key: DrawKey) -> None:
        with self._lock:
            if key in self._pending:
                return
        device = self._groups[0].device
        if device.type == "cuda":
            side = self._side_streams.get(device)
            if side is None:
                side = self._side_streams[device] = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                draws = self._compute(key)
                event = torch.cuda.Event()
                event.record(side)
            pending: Any = (draws, event)
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monteclora-noise")
            pending = self._executor.submit(self._compute, key)
        with self._lock:
            self._pending[key] = pending

    def _wait_for_side_stream(self, draws: list[BartlettDraw], event: Any) -> list[BartlettDraw]:
        current = torch.cuda.current_stream(self._groups[0].device)
        current.wait_event(event)
        for draw in draws:
            for tensor in (draw.noise, draw.row_sq, draw.log_det):
                tensor.record_stream(current)
        return draws

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

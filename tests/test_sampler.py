"""The noise sampler: one batched draw per shape group, the same draws in every mode, state."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from monte_ds import MonteCLoRAConfig, get_monteclora_model, load_sampler_state, monteclora_layers, sampler_state
from monte_ds.monteclora.math import STREAM_TRAIN
from monte_ds.monteclora.sampler import resolve_mode


CPU = torch.device("cpu")


def build(load_base, **overrides):
    return get_monteclora_model(load_base(), MonteCLoRAConfig(r=4, sample_scaler=0.5, **overrides))


def engine_of(model):
    return next(iter(monteclora_layers(model))).engine


def record_draws(sampler) -> dict[tuple[int, int], str]:
    """The thread that computed each (stream, forward index)'s draws."""
    threads: dict[tuple[int, int], str] = {}
    compute = sampler._compute

    def recording(key):
        threads[key] = threading.current_thread().name
        return compute(key)

    sampler._compute = recording
    return threads


def test_one_batched_draw_per_shape_group(load_base, input_ids):
    """The tiny LLaMA has two noise shapes (n_in = hidden for six projections, = intermediate for
    down_proj): a forward draws two batches, whatever the number of layers."""
    model = build(load_base, sampler="sync")
    engine = engine_of(model)
    model.train()
    with torch.no_grad():
        model(input_ids=input_ids)
    groups = engine.sampler._groups
    assert [(g.rank, g.n_in, g.count) for g in groups] == [(4, 64, 12), (4, 128, 2)]
    assert sum(g.count for g in groups) == len(engine.layers) == 14


@pytest.mark.parametrize("device_type, expected", [("cpu", "sync"), ("cuda", "async")])
def test_auto_mode_is_the_faster_mode_of_each_device(device_type, expected):
    assert resolve_mode("auto", torch.device(device_type)) == expected
    assert resolve_mode("sync", torch.device(device_type)) == "sync"


def test_async_draws_the_next_forward_off_the_main_thread(load_base, input_ids):
    model = build(load_base, sampler="async")
    sampler = engine_of(model).sampler
    threads = record_draws(sampler)
    model.train()
    with torch.no_grad():
        model(input_ids=input_ids)  # forward 0: drawn in-step, forward 1 prefetched
        model(input_ids=input_ids)  # forward 1: taken from the prefetch, forward 2 prefetched
    assert threads[(STREAM_TRAIN, 0)] == threading.current_thread().name
    assert threads[(STREAM_TRAIN, 1)].startswith("monteclora-noise")
    assert set(sampler._pending) == {(STREAM_TRAIN, 2)}  # at most the next forward is pending


def test_sync_mode_draws_in_step_and_keeps_nothing_pending(load_base, input_ids):
    model = build(load_base, sampler="sync")
    sampler = engine_of(model).sampler
    threads = record_draws(sampler)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=input_ids)
    assert set(threads.values()) == {threading.current_thread().name}
    assert not sampler._pending and sampler._executor is None


def test_stale_prefetches_are_dropped_on_resume(load_base, input_ids):
    model = build(load_base, sampler="async")
    engine = engine_of(model)
    model.train()
    with torch.no_grad():
        model(input_ids=input_ids)
    assert engine.sampler._pending
    engine.load_state_dict({"seed": 0, "forward_index": 7})
    assert not engine.sampler._pending


def test_sampler_state_round_trip_and_seed_check(load_base, input_ids):
    model = build(load_base, seed=5)
    model.train()
    with torch.no_grad():
        model(input_ids=input_ids)
        model(input_ids=input_ids)
    state = sampler_state(model)
    assert state == {"seed": 5, "forward_index": 2}
    other = build(load_base, seed=5)
    load_sampler_state(other, state)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, other(input_ids=input_ids).logits)
    with pytest.raises(ValueError, match="seed 5.*seed 6"):
        load_sampler_state(build(load_base, seed=6), state)


def test_engine_pickles_without_its_thread_or_graph(load_base, input_ids):
    model = build(load_base, sampler="async")
    model.train()
    model(input_ids=input_ids)  # a forward with autograd: the engine holds its graph
    engine = engine_of(model)
    assert engine.sampler._executor is not None and engine.sampler._pending
    restored = pickle.loads(pickle.dumps(engine))
    assert restored.sampler._executor is None and not restored.sampler._pending
    assert restored.state_dict() == engine.state_dict()
    assert copy.deepcopy(engine).forward_index == engine.forward_index


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the side-stream path)")
def test_cuda_side_stream_draws_equal_sync_draws(tiny_checkpoint, input_ids):
    from transformers import LlamaForCausalLM

    logits = {}
    for mode in ("sync", "async"):
        base = LlamaForCausalLM.from_pretrained(tiny_checkpoint).cuda()
        model = get_monteclora_model(base, MonteCLoRAConfig(r=4, sample_scaler=0.5, sampler=mode))
        model.train()
        with torch.no_grad():
            logits[mode] = [model(input_ids=input_ids.cuda()).logits for _ in range(3)]
    for a, b in zip(logits["sync"], logits["async"]):
        assert torch.equal(a, b)

"""The asynchronous noise source: same draws as the synchronous one, bounded memory, state."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from monte_ds import MonteCLoRAConfig, get_monteclora_model, load_sampler_state, monteclora_layers, sampler_state
from monte_ds.monteclora.math import STREAM_TRAIN


def build(load_base, **overrides):
    return get_monteclora_model(load_base(), MonteCLoRAConfig(r=4, sample_scaler=0.5, **overrides))


def record_pending(model) -> list[int]:
    """Number of prefetched draws alive each time a layer runs."""
    seen: list[int] = []
    for layer in monteclora_layers(model):
        layer.register_forward_hook(lambda module, args, out: seen.append(len(module.source._pending)))
    return seen


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetched_draws_are_bounded_by_prefetch_layers(load_base, input_ids, prefetch):
    model = build(load_base, prefetch_layers=prefetch)
    seen = record_pending(model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=input_ids)
    assert len(seen) == 3 * 14
    assert max(seen) <= prefetch
    assert max(seen[14:]) == prefetch  # in steady state it does prefetch that far ahead


def test_async_draws_are_computed_off_the_main_thread(load_base, input_ids):
    model = build(load_base)
    source = next(iter(monteclora_layers(model))).source
    threads: dict[tuple[int, int, int], str] = {}
    compute = source._compute

    def recording(key, device):
        threads[key] = threading.current_thread().name
        return compute(key, device)

    source._compute = recording
    model.train()
    with torch.no_grad():
        model(input_ids=input_ids)  # first forward (index 0): layer devices are learnt as it goes
        model(input_ids=input_ids)  # second forward (index 1): every draw was prefetched
    second = {key: name for key, name in threads.items() if key[1] == 1}
    assert len(second) == 14
    assert all(name.startswith("monteclora-noise") for name in second.values())


def test_stale_draws_of_older_forwards_are_dropped(load_base, input_ids):
    model = build(load_base, prefetch_layers=2)
    source = next(iter(monteclora_layers(model))).source
    model.train()
    with torch.no_grad():
        model(input_ids=input_ids)
    # a recomputation-like out-of-order access leaves predictions for this forward behind
    source.take((STREAM_TRAIN, source.current_index, 3), torch.device("cpu"))
    source.begin_training_forward()
    assert all(key[1] >= source.current_index for key in source._pending)


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


def test_source_pickles_without_its_thread(load_base, input_ids):
    model = build(load_base)
    model.train()
    with torch.no_grad():
        model(input_ids=input_ids)
    source = next(iter(monteclora_layers(model))).source
    assert source._executor is not None and source._pending
    restored = pickle.loads(pickle.dumps(source))
    assert restored._executor is None and not restored._pending
    assert restored.state_dict() == source.state_dict()
    assert copy.deepcopy(source).forward_index == source.forward_index


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

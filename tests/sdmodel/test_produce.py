"""The one generation path, with a stand-in model: batches the device holds, out-of-memory
halving kept for what follows, a failing request isolated when asked, raised otherwise."""
from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pytest
import torch

from sdq.core.params import GenerationParams, Request
from sdq.sdmodel.lora import canonical
from sdq.sdmodel.produce import produce
from tests.fakes import FakePipeline


def params(count: int, **fields: object) -> list[GenerationParams]:
    return [GenerationParams(f"a boat {n}", seed=n, width=64, height=64, **fields)  # type: ignore[arg-type]
            for n in range(count)]


def small_device(requests: Sequence[Request]) -> None:
    """A device that holds two images at once, and a prompt that breaks generation."""
    if len(requests) > 2:
        raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
    if any("poison" in r.prompt for r in requests):
        raise IndexError("index 77 is out of bounds for dimension 1 with size 77")


def test_batches_follow_the_size_and_group_by_shape() -> None:
    pipe = FakePipeline(batch_size=3)
    mixed = [*params(4), *params(2, steps=10)]
    produced = list(produce(pipe, mixed))
    assert [p.indices for p in produced] == [(4, 5), (0, 1, 2), (3,)]  # shapes in their order
    assert [len(p.images) for p in produced] == [2, 3, 1]
    assert [p.indices for p in produce(pipe, params(4), batch_size=4)] == [(0, 1, 2, 3)]


def test_out_of_memory_halves_the_batch_for_what_follows() -> None:
    pipe, smaller, steps = FakePipeline(fail=small_device), [], []
    produced = list(produce(pipe, params(9), batch_size=5, on_smaller=smaller.append,
                            on_step=lambda images, i, total: steps.append(images)))
    assert pipe.calls == [(0, 1, 2, 3, 4), (0, 1), (2, 3), (4,), (5, 6), (7, 8)]
    assert [p.indices for p in produced] == [(0, 1), (2, 3), (4,), (5, 6), (7, 8)]
    assert smaller == [2] and all(p.error is None for p in produced)
    assert steps == [2, 2, 1, 2, 2]  # progress of the batches that ran, by their size


def test_a_request_that_fails_alone_is_isolated_or_raised() -> None:
    pipe = FakePipeline(fail=small_device)
    batch = params(2)
    batch[1] = GenerationParams("poison apple", seed=1, width=64, height=64)
    produced = list(produce(pipe, batch, isolate=True))
    assert [(p.indices, p.error) for p in produced] == [
        ((0,), None), ((1,), "generation: IndexError: index 77 is out of bounds for dimension 1 with size 77")]
    with pytest.raises(IndexError):
        list(produce(FakePipeline(fail=small_device), batch))
    with pytest.raises(torch.OutOfMemoryError):  # alone and still too big: nothing to split
        list(produce(FakePipeline(fail=lambda requests: small_device([*requests] * 3)), params(1)))


def test_batches_group_by_lora_set_so_each_set_is_merged_once() -> None:
    """64 items alternating 4 LoRA sets (and none) at batch size 8: one run of batches per set,
    each batch of one set, the sets in order of first appearance; a set given in another order
    is the same set."""
    pipe = FakePipeline(batch_size=8)
    sets = [(), (("a", 1.0, "h1"),), (("b", 0.5, "h2"),), (("a", 1.0, "h1"), ("b", 0.5, "h2")),
            (("b", 0.5, "h2"), ("a", 1.0, "h1"))]
    loras = [sets[n % 4 + (n % 8 == 7)] for n in range(64)]
    produced = list(produce(pipe, params(64), loras=loras))
    assert sum(len(p.indices) for p in produced) == 64
    for p, asked in zip(produced, pipe.lora_sets):
        assert {tuple(sorted(loras[i])) for i in p.indices} == {tuple(sorted(asked))}
    switches = [s for n, s in enumerate(pipe.lora_sets) if n == 0 or s != pipe.lora_sets[n - 1]]
    assert [tuple(sorted(s)) for s in switches] == [(), (("a", 1.0, "h1"),), (("b", 0.5, "h2"),),
                                                    (("a", 1.0, "h1"), ("b", 0.5, "h2"))]
    list(produce(pipe, params(2)))
    assert pipe.lora_sets[-1] == ()  # no LoRAs given: the pipeline's own default (none)


def test_the_set_merged_now_goes_first() -> None:
    """A batch starting where the last one ended (its set still merged) switches once less;
    the other sets keep their order of first appearance."""
    pipe = FakePipeline(batch_size=8)
    a, b, c = (("a", 1.0, "h1"),), (("b", 0.5, "h2"),), (("c", 0.7, "h3"),)
    pipe.adapters = SimpleNamespace(current=canonical(c))  # type: ignore[attr-defined]
    list(produce(pipe, params(6), loras=[a, b, c] * 2))
    assert [tuple(s) for s in pipe.lora_sets] == [c, a, b]

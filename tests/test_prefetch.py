"""Background prefetch (napari_sam.prefetch): order, replacement, no double work, priority."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

import napari_sam as ns
from napari_sam.engine.prefetch import Prefetcher, neighbours

pytest.importorskip("torch")


@pytest.fixture
def stack():
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, (12, 64, 80)).astype(np.uint16)


def test_neighbours_follow_the_direction_of_travel():
    assert neighbours(5, 10) == [6, 7, 4]
    assert neighbours(5, 10, previous=4) == [6, 7, 4]
    assert neighbours(5, 10, previous=6) == [4, 3, 6]  # walking backwards
    assert neighbours(9, 10) == [8]  # clipped at the end
    assert neighbours(0, 10, previous=1) == [1]
    assert neighbours(3, 10, ahead=3, behind=0) == [4, 5, 6]


def test_request_embeds_in_background_and_thread_ends(tiny_model, stack):
    seg = ns.Segmenter(tiny_model, stack)
    queued = seg.prefetch([3, 4, 4, 5])
    assert queued == [3, 4, 5]
    assert seg.prefetcher.wait(timeout=120)
    assert all(seg.cache.in_memory(i) for i in (3, 4, 5))
    assert not seg.cache.in_memory(6)
    pre = seg.prefetcher
    assert pre.stats["embedded"] == 3 and seg.cache.stats["encoder_calls"] == 3
    assert not pre.busy
    for t in threading.enumerate():  # the thread ends with its work: no idle thread left
        if t.name == "napari-sam-prefetch":
            t.join(timeout=30)
    assert not any(t.name == "napari-sam-prefetch" for t in threading.enumerate())
    # already in memory: nothing to queue, nothing recomputed
    assert seg.prefetch([3, 4]) == []
    before = seg.cache.stats["encoder_calls"]
    seg.embedding(4)
    assert seg.cache.stats["encoder_calls"] == before


def test_newest_request_replaces_the_queue(tiny_model, stack):
    seg = ns.Segmenter(tiny_model, stack)
    cache = seg.cache
    gate = cache._slice_locks.setdefault(1, threading.Lock())
    gate.acquire()  # the prefetcher blocks on slice 1 until released
    try:
        seg.prefetch([1, 2, 3, 4])
        assert seg.prefetcher.wait_working_on(1, timeout=60)
        assert seg.prefetch([8]) == [8]  # the user jumped away
    finally:
        gate.release()
    assert seg.prefetcher.wait(timeout=120)
    assert cache.in_memory(8) and cache.in_memory(1)
    assert not any(cache.in_memory(i) for i in (2, 3, 4))
    assert seg.prefetcher.stats["dropped"] == 3


def test_get_waits_for_a_prefetch_instead_of_encoding_twice(tiny_model, stack):
    seg = ns.Segmenter(tiny_model, stack)
    seg.prefetch([7])
    emb = seg.embedding(7)  # while (or after) the prefetcher works on it
    assert seg.prefetcher.wait(timeout=120)
    assert seg.cache.stats["encoder_calls"] == 1
    assert seg.embedding(7) is emb


def test_follow_includes_the_slice_and_keeps_direction(tiny_model, stack):
    seg = ns.Segmenter(tiny_model, stack)
    pre = seg.prefetcher
    gate = seg.cache._slice_locks.setdefault(6, threading.Lock())
    with gate:  # keep the queue visible: the thread blocks on slice 6
        assert seg.prefetch(around=6) == [6, 7, 8, 5]
        # until the thread holds 6: else it may encode 5 before the next request, which
        # would then skip it
        assert pre.wait_working_on(6, timeout=60)
        assert seg.prefetch(around=5)[:3] == [5, 4, 3]  # moved backwards
        assert seg.prefetch(around=5)[:3] == [5, 4, 3]  # a repeated call keeps the direction
    assert pre.wait(timeout=120)
    with pytest.raises(ValueError, match="either indices"):
        seg.prefetch()
    with pytest.raises(ValueError, match="either indices"):
        seg.prefetch([1], around=2)
    with pytest.raises(IndexError, match="out of range"):
        seg.prefetch([99])


def test_errors_are_kept_and_the_queue_goes_on(tiny_model, stack, monkeypatch):
    seg = ns.Segmenter(tiny_model, stack)
    compute = seg.cache._compute

    def failing(index):
        if index == 2:
            raise OSError("slice 2 is unreadable")
        return compute(index)

    monkeypatch.setattr(seg.cache, "_compute", failing)
    seg.prefetch([2, 3])
    assert seg.prefetcher.wait(timeout=120)
    pre = seg.prefetcher
    assert pre.stats["errors"] == 1 and "slice 2 is unreadable" in str(pre.last_error)
    assert seg.cache.in_memory(3) and not seg.cache.in_memory(2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux")
def test_prefetch_thread_runs_at_lower_priority(tiny_model, stack, monkeypatch):
    seg = ns.Segmenter(tiny_model, stack)
    seen = []
    get = seg.cache.get

    def recording(index):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return get(index)

    monkeypatch.setattr(seg.cache, "get", recording)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    seg.prefetch([0])
    assert seg.prefetcher.wait(timeout=120)
    assert seen == [min(19, base + seg.prefetcher.nice)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # caller untouched


def test_prefetch_fills_the_store_too(tiny_model, stack, tmp_path):
    seg = ns.Segmenter(tiny_model, stack, cache=tmp_path / "s.zarr")
    seg.prefetch([0, 1])
    assert seg.prefetcher.wait(timeout=120)
    again = ns.Segmenter(tiny_model, stack, cache=tmp_path / "s.zarr")
    assert list(again.cache.stored_indices()) == [0, 1]


def test_cancel_prefetch_drops_the_queue(tiny_model, stack):
    seg = ns.Segmenter(tiny_model, stack)
    seg.cancel_prefetch()  # no prefetcher yet: nothing to do
    assert seg._prefetcher is None
    gate = seg.cache._slice_locks.setdefault(0, threading.Lock())
    with gate:
        seg.prefetch([0, 1, 2])
        seg.cancel_prefetch()
        assert seg.prefetcher.queue == ()
    assert seg.prefetcher.wait(timeout=120)
    assert not seg.cache.in_memory(1) and not seg.cache.in_memory(2)


def test_prefetcher_rejects_nothing_it_should_accept(tiny_model, stack):
    pre = Prefetcher(ns.Segmenter(tiny_model, stack).cache, nice=0, ahead=1, behind=0)
    assert pre.follow(3) == [3, 4]
    assert pre.wait(timeout=120)
    assert pre.stats["embedded"] == 2

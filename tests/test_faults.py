"""Fault injection: kill -9 during store and batch writes, a full disk, a read-only cache,
and a reader next to a writer. Nothing may be corrupt, nothing served as garbage, no labels
lost, and every job resumes.

Related: test_cli.py::test_kill_and_resume (kill -9 during a segment job writing .ome.zarr),
test_engine.py::test_two_processes_share_one_store and
test_engine.py::test_truncated_chunk_is_detected_and_recomputed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import napari_sam as ns
from napari_sam.engine.store import EmbeddingStoreWarning
from napari_sam.workflows import batch

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TOL = 1e-2  # int8 store vs fresh float32 features, relative to the largest (as test_engine)


def _cli(*args):
    return [sys.executable, "-m", "napari_sam.cli", *map(str, args)]


@pytest.fixture(scope="module")
def stack_tif(tmp_path_factory):
    rng = np.random.default_rng(7)
    img = rng.normal(100, 5, (8, 48, 56))
    img[:, 10:30, 12:40] += 400
    path = tmp_path_factory.mktemp("faults") / "vol.tif"
    tifffile.imwrite(path, img.astype(np.uint16), metadata={"axes": "ZYX"}, photometric="minisblack")
    return path


@pytest.fixture(scope="module")
def fresh(tiny_model, stack_tif):
    """Reference features of every slice, computed in memory."""
    cache = ns.EmbeddingCache(tiny_model, ns.open_stack(stack_tif), memory_bytes=0)
    return [cache.get(i).features.clone() for i in range(len(cache))]


def _check_store(model, stack_tif, store, fresh) -> dict:
    """A fresh reader loads every slice valid or recomputes it; never garbage."""
    cache = ns.EmbeddingCache(model, ns.open_stack(stack_tif), store=store, memory_bytes=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for i, ref in enumerate(fresh):
            emb = cache.get(i)
            assert (emb.features - ref).abs().max() < TOL * ref.abs().max(), f"slice {i} served garbage"
            assert emb.original_size == (48, 56)
    stats = dict(cache.stats)
    stats["warnings"] = [str(x.message) for x in w]
    return stats


EMBED_LOOP = textwrap.dedent(
    """
    import sys
    import napari_sam as ns
    model = ns.load_model(checkpoint=sys.argv[1], device="cpu")
    seg = ns.Segmenter(model, sys.argv[2], cache=sys.argv[3])
    print("ready", flush=True)
    seg.embed(progress=lambda d, t: print("done", d, flush=True))
    """
)


def test_random_sigkill_during_embedding_store_writes(tiny_checkpoint, tiny_model, stack_tif,
                                                      fresh, tmp_path):
    """SIGKILL at random moments, several times, alternating the Segmenter.embed loop and
    the ``napari-sam embed`` command; then every slice is valid or recomputed."""
    store = tmp_path / "e.zarr"
    rng = np.random.default_rng(11)
    for k in range(4):
        if k % 2 == 0:
            args = [sys.executable, "-c", EMBED_LOOP, str(tiny_checkpoint), str(stack_tif), str(store)]
        else:
            args = _cli("embed", stack_tif, "--cache", store, "--checkpoint", tiny_checkpoint,
                        "--device", "cpu", "-q")
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
        if k % 2 == 0:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.0, 1.5))
        else:
            time.sleep(rng.uniform(3.0, 6.0))  # the command imports torch first
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    stats = _check_store(tiny_model, stack_tif, store, fresh)
    assert stats["store_hits"] + stats["encoder_calls"] == 8
    # and a resumed run finishes the store
    again = subprocess.run(_cli("embed", stack_tif, "--cache", store, "--checkpoint",
                                tiny_checkpoint, "--device", "cpu", "-q"),
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr
    assert _check_store(tiny_model, stack_tif, store, fresh)["encoder_calls"] == 0


KILL_AT = textwrap.dedent(
    """
    import os, signal, sys
    import zarr.storage._local as local
    import napari_sam as ns
    stage, nth = sys.argv[4], int(sys.argv[5])
    real_put = local._put
    seen = {"n": 0}

    def put(path, value, exclusive=False):
        name = str(path)
        target = "/features/" if stage.startswith("features") else "/records/"
        if target in name and "/c/" in name:
            seen["n"] += 1
            if seen["n"] == nth:
                if stage.endswith("torn"):  # a non-atomic file system: half a chunk on disk
                    data = bytes(value.as_buffer_like())
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        return real_put(path, value, exclusive)

    local._put = put
    model = ns.load_model(checkpoint=sys.argv[1], device="cpu")
    seg = ns.Segmenter(model, sys.argv[2], cache=sys.argv[3])
    seg.embed()
    """
)


@pytest.mark.parametrize("stage, nth", [("features", 3), ("features-torn", 3),
                                        ("records", 2), ("records-torn", 4)])
def test_sigkill_at_each_write_stage(tiny_checkpoint, tiny_model, stack_tif, fresh, tmp_path,
                                     stage, nth):
    """Killed before a features chunk, with half a features chunk on disk, between the
    features and the record, with half a record on disk: the next reader recomputes that
    slice (with a warning for a torn chunk) and serves the others."""
    store = tmp_path / "e.zarr"
    proc = subprocess.run([sys.executable, "-c", KILL_AT, str(tiny_checkpoint), str(stack_tif),
                           str(store), stage, str(nth)], capture_output=True, env=ENV, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    stats = _check_store(tiny_model, stack_tif, store, fresh)
    assert stats["store_hits"] == nth - 1  # the slices finished before the kill are served
    assert stats["encoder_calls"] == 8 - (nth - 1)


# ------------------------------------------------------------------ batch writes


def _points_csv(path: Path, n: int) -> Path:
    lines = ["index,axis-0,axis-1,axis-2,label"]
    lines += [f"{z},{z:.1f},20.0,{14 + 2 * z:.1f},1.0" for z in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reference_labels(tiny_model, stack_tif, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.ome.zarr"
    csv = _points_csv(out.parent / "p.csv", 8)
    batch.segment_prompts(stack_tif, csv, out, model=tiny_model)
    return np.asarray(zarr.open_array(out / "0")[:]), csv


def test_sigkill_during_batch_tiff_output_then_resume(tiny_checkpoint, stack_tif,
                                                      reference_labels, tmp_path, kill_part_way):
    ref, csv = reference_labels
    out = tmp_path / "labels.tif"
    work = Path(str(out) + ".partial.zarr")
    args = _cli("segment", stack_tif, "--prompts", csv, "--out", out, "--checkpoint",
                tiny_checkpoint, "--device", "cpu", "-q")
    finished = kill_part_way(args, work, env=ENV)
    assert 2 <= finished < 8 and not out.exists()
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)
    assert again.returncode == 0, again.stderr
    m = re.search(r"(\d+) units computed, (\d+) already done", again.stdout)
    assert m and (int(m[1]), int(m[2])) == (8 - finished, finished)
    np.testing.assert_array_equal(tifffile.imread(out), ref)
    assert not work.exists()


KILL_BEFORE_TIFF_RENAME = textwrap.dedent(
    """
    import os, signal, sys
    import napari_sam as ns
    from napari_sam.workflows import batch
    real = os.replace
    def replace(src, dst):
        if str(dst).endswith(".tif"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
    model = ns.load_model(checkpoint=sys.argv[1], device="cpu")
    batch.segment_prompts(sys.argv[2], sys.argv[3], sys.argv[4], model=model)
    """
)


def test_sigkill_while_writing_the_tiff_then_resume(tiny_checkpoint, tiny_model, stack_tif,
                                                    reference_labels, tmp_path):
    """Killed after the temporary TIFF is written, before it replaces OUT: OUT does not
    exist (never a half TIFF under its name), and the rerun writes it without segmenting."""
    ref, csv = reference_labels
    out = tmp_path / "labels.tif"
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_TIFF_RENAME, str(tiny_checkpoint),
                           str(stack_tif), str(csv), str(out)], capture_output=True, env=ENV,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    res = batch.segment_prompts(stack_tif, csv, out, model=tiny_model)
    assert res.computed == 0 and res.resumed == 8 and res.encoder_calls == 0
    np.testing.assert_array_equal(tifffile.imread(out), ref)


# ------------------------------------------------------------------ full disk, read-only


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the "
                    "RLIMIT_FSIZE test covers a failing store write")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount_ro(path: Path) -> None:
    r = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only ({r.stderr.strip()})")


def test_full_disk_embedding_cache_warns_once_and_continues(tiny_model, stack_tif, fresh, tmp_path):
    """A 3 MiB file system holds one 2 MiB float16 slice: the next write fails, one
    warning, every embedding still correct (memory), and the store stays valid."""
    with _tmpfs(tmp_path / "disk", "3m") as disk:
        store = disk / "e.zarr"
        cache = ns.EmbeddingCache(tiny_model, ns.open_stack(stack_tif), store=store,
                                  store_dtype="float16")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for i, ref in enumerate(fresh):
                assert (cache.get(i).features - ref).abs().max() < 1e-5
        msgs = [str(x.message) for x in w if issubclass(x.category, EmbeddingStoreWarning)]
        assert len(msgs) == 1 and "No space left" in msgs[0] and "memory only" in msgs[0]
        assert cache.stats["encoder_calls"] == 8
        stats = _check_store(tiny_model, stack_tif, store, fresh)
        assert stats["store_hits"] >= 1 and stats["store_hits"] + stats["encoder_calls"] == 8


FSIZE_SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, sys, warnings
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 19, 1 << 19))
    import napari_sam as ns
    model = ns.load_model(checkpoint=sys.argv[1], device="cpu")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        seg = ns.Segmenter(model, sys.argv[2], cache=sys.argv[3])
        for i in range(len(seg.stack)):
            seg.cache.get(i)
    print(json.dumps({"stats": seg.cache.stats, "warnings": [str(x.message) for x in w]}))
    """
)


def test_file_size_limit_embedding_cache_warns_once(tiny_checkpoint, tiny_model, stack_tif,
                                                     fresh, tmp_path):
    """The same without a mount: RLIMIT_FSIZE (512 KiB < a 1 MiB int8 features chunk)."""
    store = tmp_path / "e.zarr"
    out = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(tiny_checkpoint),
                          str(stack_tif), str(store)], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["stats"]["encoder_calls"] == 8
    assert len(res["warnings"]) == 1 and "File too large" in res["warnings"][0]
    stats = _check_store(tiny_model, stack_tif, store, fresh)
    assert stats["store_hits"] == 0 and stats["encoder_calls"] == 8


@pytest.mark.parametrize("free_kib", [24, 64], ids=["while-creating", "mid-job"])
def test_full_disk_batch_job_fails_clearly_and_resumes(tiny_checkpoint, stack_tif,
                                                       reference_labels, tmp_path, free_kib):
    """ENOSPC while the output is created or after some slices: exit 1 with one line, then
    (space freed) the same command resumes and gives the uninterrupted result."""
    ref, csv = reference_labels
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "labels.ome.zarr"
        ballast = disk / "ballast"
        # tmpfs blocks are 4 KiB: 24 KiB fill up while the output is created, 64 KiB
        # after a few slices (a complete run needs ~25 files)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        ballast.write_bytes(b"\0" * (free - free_kib * 1024))
        args = _cli("segment", stack_tif, "--prompts", csv, "--out", out, "--checkpoint",
                    tiny_checkpoint, "--device", "cpu", "-q")
        first = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
        assert first.returncode == 1, first.stderr
        err = first.stderr.strip().splitlines()
        assert len(err) == 1 and "No space left on device" in err[0] and "resume" in err[0], err
        assert "Traceback" not in first.stderr
        ballast.unlink()
        again = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
        assert again.returncode == 0, again.stderr
        np.testing.assert_array_equal(zarr.open_array(out / "0")[:], ref)


def test_read_only_cache_folder(tiny_model, stack_tif, fresh, tmp_path):
    """A read-only mount (root ignores chmod 555): an existing store is read, new slices
    stay in memory with a warning; a new store there is not created (warning)."""
    with _tmpfs(tmp_path / "ro", "16m") as ro:
        store = ro / "e.zarr"
        ns.EmbeddingCache(tiny_model, ns.open_stack(stack_tif), store=store).embed([0, 1])
        _remount_ro(ro)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            cache = ns.EmbeddingCache(tiny_model, ns.open_stack(stack_tif), store=store)
            for i, ref in enumerate(fresh):
                assert (cache.get(i).features - ref).abs().max() < TOL * ref.abs().max()
            assert cache.stats["store_hits"] == 2 and cache.stats["encoder_calls"] == 6
            assert len([x for x in w if issubclass(x.category, EmbeddingStoreWarning)]) == 1
        with pytest.warns(EmbeddingStoreWarning, match="cannot create embedding store"):
            other = ns.EmbeddingCache(tiny_model, ns.open_stack(stack_tif), store=ro / "new.zarr")
        assert other.store_group is None and other.get(0).features.shape == (1, 256, 64, 64)


# ------------------------------------------------------------------ concurrency


def test_reader_next_to_a_batch_embed_writer(tiny_checkpoint, tiny_model, stack_tif, fresh,
                                             tmp_path):
    """A Segmenter with slice verification (as the widget) reads a store while
    ``napari-sam embed`` fills it: every get hits a complete slice or computes it."""
    store = tmp_path / "e.zarr"
    writer = subprocess.Popen(_cli("embed", stack_tif, "--cache", store, "--checkpoint",
                                   tiny_checkpoint, "--device", "cpu", "-q"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 120
    while not (store / "zarr.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    hits = computed = rounds = 0
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        while rounds < 2 or (writer.poll() is None and rounds < 50):
            seg = ns.Segmenter(tiny_model, stack_tif, cache=store, memory_bytes=0)
            assert seg.cache.verify_slices
            for i in (7, 0, 5, 2):  # not in the writer's order
                emb = seg.embedding(i)
                assert (emb.features - fresh[i]).abs().max() < TOL * fresh[i].abs().max()
            hits += seg.cache.stats["store_hits"]
            computed += seg.cache.stats["encoder_calls"]
            rounds += 1
    assert writer.wait(timeout=300) == 0, writer.stderr.read()
    assert hits + computed == 4 * rounds
    assert not [x for x in w if "recomputing" in str(x.message)]  # never a torn slice seen
    assert _check_store(tiny_model, stack_tif, store, fresh)["encoder_calls"] == 0


def test_sibling_write_errors_are_not_logged_after_the_report(caplog):
    """zarr writes metadata files concurrently; on a full disk the siblings of the error the
    CLI reports can end with nobody retrieving theirs (the loop stops at exit), and asyncio
    then logs each with a traceback. Those records (OSError only) are dropped."""
    import asyncio
    import gc
    import logging

    from napari_sam.io.zarr_logging import quiet_sibling_write_errors

    def unretrieved(exc: BaseException) -> list[logging.LogRecord]:
        async def fail():
            raise exc

        loop = asyncio.new_event_loop()
        try:
            task = loop.create_task(fail())
            loop.run_until_complete(asyncio.wait([task]))
        finally:
            loop.close()
        caplog.clear()
        del task
        gc.collect()
        return [r for r in caplog.records if "never retrieved" in r.getMessage()]

    caplog.set_level(logging.ERROR, logger="asyncio")
    log = logging.getLogger("asyncio")
    before = list(log.filters)
    try:
        for f in before:  # another test may have installed it: start without
            log.removeFilter(f)
        assert len(unretrieved(OSError(28, "No space left on device"))) == 1
        quiet_sibling_write_errors()
        quiet_sibling_write_errors()
        assert len(log.filters) == 1
        assert unretrieved(OSError(28, "No space left on device")) == []
        assert len(unretrieved(ValueError("a real bug"))) == 1  # other errors still show
    finally:
        for f in list(log.filters):
            log.removeFilter(f)
        for f in before:
            log.addFilter(f)

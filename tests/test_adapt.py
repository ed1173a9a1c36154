"""Adapting the mask decoder to the user's objects (``ns.adapt``, ``napari-sam adapt``).

The tiny random-weight SAM knows nothing, so these tests check what adaptation must do
whatever the base: it learns (held-out IoU clearly above the base's, seeded), the saved
checkpoint reloads through ``load_model`` and gives the adapted masks exactly, the store
of the base model is reused, cancelling leaves the base untouched, bad input is refused.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import napari_sam as ns
from napari_sam.models.checkpoint import state_dict_sha256
from napari_sam.synthetic import make_nuclei_stack
from napari_sam.workflows.adapt import AdaptSettings, adapt_objects, objects_from_labels
from napari_sam.workflows.training import (
    DecoderTrainer,
    TrainingObject,
    first_prompt,
    losses,
    single_click_iou,
)


@pytest.fixture(scope="module")
def nuclei():
    """Two 256 x 256 slices of 40 synthetic nuclei and their labels."""
    return make_nuclei_stack((2, 256, 256), n_nuclei=40, radius=(10.0, 16.0), seed=3)


@pytest.fixture(scope="module")
def nuclei_files(nuclei, tmp_path_factory):
    img, gt = nuclei
    folder = tmp_path_factory.mktemp("adapt")
    tifffile.imwrite(folder / "cells.tif", img, metadata={"axes": "ZYX"})
    tifffile.imwrite(folder / "cells_labels.tif", gt.astype(np.uint16))
    return folder / "cells.tif", folder / "cells_labels.tif"


QUICK = AdaptSettings(epochs=2, rounds=2, batch_size=4, patience=5)  # 6 steps


def _decoder_hash(model) -> str:
    return state_dict_sha256(model.sam.mask_decoder.state_dict())


# ---------------------------------------------------------------- pieces
def test_losses_rank_masks_and_measure_iou():
    target = torch.zeros(64, 64)
    target[20:40, 20:40] = 1
    good = torch.where(target > 0, 8.0, -8.0)[None]
    half = good.clone()
    half[0, 20:30, 20:40] = -8.0  # half of the object missed
    empty = torch.full((1, 64, 64), -8.0)
    for kind in ("balanced", "sam"):
        loss, iou = losses(torch.cat([good, half, empty]), torch.tensor([1.0, 0.5, 0.0]), target, kind)
        assert loss[0] < loss[1] < loss[2], kind
        np.testing.assert_allclose(iou.numpy(), [1.0, 0.5, 0.0])
    with pytest.raises(ns.InvalidInputError, match="balanced, sam"):
        losses(good, torch.tensor([1.0]), target, "focal")


def test_prompts_are_where_users_click(nuclei):
    _, gt = nuclei
    mask = gt[0] == np.unique(gt[0])[1]
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(40):
        points, labels, box = first_prompt(mask, rng, 0.5)
        if box is None:
            (y, x), = points
            assert mask[int(y), int(x)] and labels == [1]
            kinds.add("point")
        else:
            ys, xs = np.nonzero(mask)
            assert abs(box[0] - ys.min()) < 10 and abs(box[3] - xs.max() - 1) < 10  # std 2 px
            kinds.add("box")
    assert kinds == {"point", "box"}
    (y, x), = first_prompt(mask, None, 1.0)[0]  # validation: the deepest point, no box
    assert mask[int(y), int(x)]


def test_objects_from_labels(nuclei):
    img, gt = nuclei
    stack = ns.open_stack(img)
    objs = objects_from_labels(stack, gt)
    want = sum(len(np.unique(gt[z])) - 1 for z in range(2))
    assert len(objs) == want and all(o.mask.any() for o in objs)
    assert {o.index for o in objs} == {0, 1}
    o = objs[0]
    np.testing.assert_array_equal(o.mask, gt[o.index] == o.label_id)
    with pytest.raises(ns.InvalidInputError):
        objects_from_labels(stack, gt[:, :100])


# ---------------------------------------------------------------- learning
def test_adapting_on_a_handful_of_objects_raises_held_out_iou(tiny_model):
    """18 objects train, 6 are held out (never seen): one click on each held-out object
    gives a clearly better mask after 6 epochs. Seeded; the random-weight base is at
    ~0.08 here, the adapted decoder at ~0.2 (benchmarks/bench_adapt.py has the curve)."""
    img, gt = make_nuclei_stack((8, 128, 128), n_nuclei=10, radius=(16.0, 26.0), seed=3)
    stack = ns.open_stack(img)
    seg = ns.Segmenter(tiny_model, stack)
    objs = objects_from_labels(stack, gt, min_area=100)[:24]
    res = adapt_objects(seg, objs, settings=AdaptSettings(epochs=6, rounds=1, patience=10))
    r = res.record
    assert r["objects"] == {**r["objects"], "train": 18, "val": 6}
    assert r["history"][-1]["train_loss"] < r["history"][1]["train_loss"]
    assert min(h["val_loss"] for h in r["history"][1:]) < r["history"][0]["val_loss"]
    assert res.iou_after > res.iou_before + 0.06 and res.iou_after > 1.5 * res.iou_before, r
    # the held-out objects are better on average, not by one lucky object
    assert sum(a > b for a, b in zip(r["val_ious_after"], r["val_ious_before"])) >= 4


# ---------------------------------------------------------------- the result
@pytest.fixture(scope="module")
def adapted(tiny_model, nuclei):
    img, gt = nuclei
    stack = ns.open_stack(img)
    seg = ns.Segmenter(tiny_model, stack)
    objs = objects_from_labels(stack, gt)[:12]
    base_hash = _decoder_hash(tiny_model)
    res = adapt_objects(seg, objs, settings=QUICK)
    assert _decoder_hash(tiny_model) == base_hash  # the base model is untouched
    return seg, objs, res


def test_record_and_split(adapted, tiny_model):
    _, objs, res = adapted
    r = res.record
    assert r["objects"]["train"] + r["objects"]["val"] == len(objs) == 12
    assert r["objects"]["val"] == 3
    train = {tuple(v) for v in r["objects"]["train_objects"]}
    val = {tuple(v) for v in r["objects"]["val_objects"]}
    assert not train & val
    assert r["base_checkpoint_sha256"] == tiny_model.checkpoint_sha256
    assert r["encoder_unchanged"] and r["trained"] == ["mask_decoder"]
    assert [h["epoch"] for h in r["history"]] == [0, 1, 2]
    assert 0 <= r["val_iou_before"] <= 1 and 0 <= r["val_iou_after"] <= 1
    assert res.model is not None and _decoder_hash(res.model) != _decoder_hash(tiny_model)
    # only the decoder changed: the image encoder is the base's, so are its embeddings
    assert res.model.embedding_signature() == tiny_model.embedding_signature()
    assert res.model.signature() != tiny_model.signature()
    assert "held-out single-click IoU" in res.summary()


def test_same_seed_same_model(adapted, tiny_model):
    seg, objs, res = adapted
    again = adapt_objects(seg, objs, settings=QUICK)
    assert _decoder_hash(again.model) == _decoder_hash(res.model)
    other = adapt_objects(seg, objs, settings=AdaptSettings(epochs=2, rounds=2, seed=1))
    assert _decoder_hash(other.model) != _decoder_hash(res.model)


def test_checkpoint_reloads_and_reproduces_masks(adapted, tiny_model, tmp_path, nuclei):
    seg, objs, res = adapted
    img, _ = nuclei
    path = res.save(tmp_path / "cells.adapted.pth")
    with pytest.raises(ns.InvalidInputError, match="exists"):
        res.save(path)
    loaded = ns.load_model(checkpoint=path, device="cpu")
    assert loaded.adaptation["val_iou_after"] == res.iou_after
    assert loaded.checkpoint_sha256 == res.model.checkpoint_sha256
    assert loaded.embedding_signature() == tiny_model.embedding_signature()
    assert _decoder_hash(loaded) == _decoder_hash(res.model)
    prompts = [ns.Prompt.of(points=first_prompt(o.mask, None, 0)[0]) for o in objs[:4]]
    base = seg.predict_many(0, prompts)
    mine = ns.Segmenter.from_cache(seg.cache.for_model(res.model)).predict_many(0, prompts)
    again = ns.Segmenter(loaded, ns.open_stack(img)).predict_many(0, prompts)
    for a, b, c in zip(mine, again, base):
        np.testing.assert_array_equal(a.logits, b.logits)
        assert not np.array_equal(a.logits, c.logits)


def test_store_of_the_base_model_is_reused(adapted, tiny_model, tmp_path, nuclei):
    _, _, res = adapted
    img, _ = nuclei
    store = tmp_path / "cells.embeddings.zarr"
    ns.Segmenter(tiny_model, ns.open_stack(img), cache=store).embed()
    path = res.save(tmp_path / "a.pth")
    seg = ns.Segmenter(ns.load_model(checkpoint=path, device="cpu"), ns.open_stack(img), cache=store)
    seg.predict(1, points=[(60.0, 60.0)])
    assert seg.cache.stats["encoder_calls"] == 0 and seg.cache.stats["store_hits"] == 1
    # a model with another image encoder does not share the cache
    other = ns.load_model(ns.testing.make_tiny_sam(seed=5), device="cpu")
    with pytest.raises(ns.InvalidInputError, match="another image encoder"):
        seg.cache.for_model(other)


def test_cancel_leaves_the_base_untouched(tiny_model, nuclei, tmp_path):
    img, gt = nuclei
    stack = ns.open_stack(img)
    seg = ns.Segmenter(tiny_model, stack)
    before = _decoder_hash(tiny_model)
    steps = []
    res = adapt_objects(seg, objects_from_labels(stack, gt)[:8], settings=QUICK,
                        progress=lambda d, t, info: steps.append(d),
                        should_stop=lambda: len(steps) >= 1)
    assert res.cancelled and res.model is None and steps == [1]
    assert _decoder_hash(tiny_model) == before
    with pytest.raises(ns.InvalidInputError, match="cancelled"):
        res.save(tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


def test_bad_input(tiny_model, nuclei, nuclei_files, tmp_path):
    img, gt = nuclei
    stack = ns.open_stack(img)
    seg = ns.Segmenter(tiny_model, stack)
    objs = objects_from_labels(stack, gt)
    with pytest.raises(ns.InvalidInputError, match="at least 4 objects"):
        adapt_objects(seg, objs[:3])
    for bad, match in ((dict(val_fraction=1.0), "val_fraction"), (dict(epochs=0), "epochs"),
                       (dict(loss="l2"), "loss"), (dict(lr=0.0), "lr")):
        with pytest.raises(ns.InvalidInputError, match=match):
            adapt_objects(seg, objs, settings=AdaptSettings(**bad))
    with pytest.raises(ns.InvalidInputError, match="tiling threshold"):
        adapt_objects(ns.TiledSegmenter(tiny_model, stack, tile=128, overlap=32), objs)
    image, labels = nuclei_files
    out = tmp_path / "mine.pth"
    out.write_bytes(b"the user's file")
    with pytest.raises(ns.InvalidInputError, match="exists"):
        ns.adapt(tiny_model, image, labels, out=out)
    assert out.read_bytes() == b"the user's file"
    with pytest.raises(ns.InvalidInputError, match="does not exist"):
        ns.adapt(tiny_model, image, tmp_path / "nope.tif")


# ---------------------------------------------------------------- front ends
def test_api_on_files(tiny_model, nuclei_files, tmp_path):
    image, labels = nuclei_files
    out = tmp_path / "cells.adapted.pth"
    res = ns.adapt(tiny_model, image, labels, out=out, slices=[1], epochs=1, rounds=1)
    assert res.path == out and out.exists()
    assert {v[0] for v in res.record["objects"]["train_objects"]} == {1}
    assert res.record["source"]["labels"] == str(labels.resolve())
    assert ns.load_model(checkpoint=out, device="cpu").adaptation["settings"]["epochs"] == 1


def test_cli_adapt(tiny_checkpoint, nuclei_files, tmp_path):
    image, labels = nuclei_files
    out = tmp_path / "cells.adapted.pth"
    installed = str(Path(sys.executable).with_name("napari-sam"))
    args = [installed, "adapt", str(labels), str(image), "--out", str(out), "--checkpoint",
            str(tiny_checkpoint), "--device", "cpu", "--epochs", "1", "--rounds", "1",
            "--slices", "0"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "held-out single-click IoU" in run.stdout and "epoch 1/1" in run.stderr
    model = ns.load_model(checkpoint=out, device="cpu")
    assert model.adaptation["objects"]["train"] > 0
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "exists" in again.stderr  # never over the user's file
    tiled = subprocess.run([*args[:-4], "--out", str(tmp_path / "t.pth"), "--tile-above", "128"],
                           capture_output=True, text=True, timeout=600)
    assert tiled.returncode == 2 and "--tile-above 0" in tiled.stderr
    seg = subprocess.run([installed, "segment", str(image), "--checkpoint", str(out), "--device",
                          "cpu", "--prompts", str(_points_csv(tmp_path)), "--out",
                          str(tmp_path / "seg.tif"), "-q"], capture_output=True, text=True,
                         timeout=600)
    assert seg.returncode == 0, seg.stderr
    assert tifffile.imread(tmp_path / "seg.tif").shape == (2, 256, 256)


def _points_csv(folder: Path) -> Path:
    path = folder / "points.csv"
    path.write_text("index,axis-0,axis-1,axis-2\n0,0,100,100\n")
    return path


def test_trainer_uses_low_resolution_targets(tiny_model, nuclei):
    img, gt = nuclei
    stack = ns.open_stack(img)
    seg = ns.Segmenter(tiny_model, stack)
    obj = TrainingObject(0, gt[0] == np.unique(gt[0])[1])
    trainer = DecoderTrainer(tiny_model, tiny_model.sam.mask_decoder, seg)
    t = trainer.target(obj)
    assert tuple(t.shape) == (256, 256)
    # 256 px slice -> 1024 input -> 256 low-res: the same pixel count
    assert abs(int(t.sum()) - int(obj.mask.sum())) <= 0.1 * obj.mask.sum()
    ious = single_click_iou(tiny_model, seg, [obj])
    assert len(ious) == 1 and 0 <= ious[0] <= 1

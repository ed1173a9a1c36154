"""Adapt SAM to the user's own data: fine-tune the mask decoder on committed objects.

The image embeddings are already cached (memory, the store): training never runs the
image encoder. Each object (a label on a slice) is seen as users prompt it, as SAM was
trained (:mod:`.training`): a first prompt (a click inside the object, or its box with
jitter), then ``rounds - 1`` corrections, each adding a click in the largest error
region and the previous logits as mask input. Only the mask decoder's weights change
(AdamW); the prompt encoder and the image encoder stay frozen, so the adapted model's
embeddings are its base model's and its store signature is the base's
(:meth:`napari_sam.models.sam.SamModel.embedding_signature`).

Objects are split into training and validation (``val_fraction``, by a seeded shuffle).
Each epoch ends with the validation loss (fixed prompts: the deepest point, then
deterministic corrections); training stops when it has not improved for ``patience``
epochs and the best epoch is kept. The held-out IoU of one click (the deepest point of
each validation object, the best of SAM's three masks) is measured before and after.

The base model is never changed: the decoder is trained as a copy, and a cancelled run
returns no model. :meth:`AdaptResult.save` writes a checkpoint that
:func:`napari_sam.load_model` reads (``{"model_state": ..., "napari_sam": record}``).

Examples
--------
>>> import napari_sam as ns
>>> res = ns.adapt("vit_b", "cells.tif", "cells.labels.ome.zarr",
...                out="cells.adapted.pth")                       # doctest: +SKIP
>>> res.iou_before, res.iou_after                                 # doctest: +SKIP
>>> seg = ns.Segmenter("cells.adapted.pth", "cells.tif", cache="auto")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .._errors import InvalidInputError
from ..io.provenance import now
from .from_labels import check_labels_shape, label_masks
from .training import DecoderTrainer, TrainingObject, check_loss, single_click_iou

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.segment import Segmenter
    from ..models.sam import SamModel

__all__ = ["AdaptResult", "AdaptSettings", "TrainingObject", "adapt", "adapt_objects",
           "objects_from_labels"]

#: progress(steps done, steps in all, info): info has epoch, epochs, loss (the epoch's
#: running training loss), val_loss (the last epoch's), and end_of_epoch
Progress = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class AdaptSettings:
    """How the decoder is trained (see :func:`adapt` for each one)."""

    epochs: int = 20
    lr: float = 3e-4
    loss: str = "balanced"
    val_fraction: float = 0.25
    patience: int = 4
    rounds: int = 2
    box_fraction: float = 0.5
    batch_size: int = 1
    seed: int = 0

    def check(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise InvalidInputError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("epochs", "rounds", "batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InvalidInputError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.box_fraction <= 1:
            raise InvalidInputError(f"box_fraction must be in [0, 1], got {self.box_fraction}")
        check_loss(self.loss)


@dataclass
class AdaptResult:
    """An adapted model and how it was made.

    Attributes
    ----------
    model : SamModel or None
        The base model with the trained mask decoder (None when cancelled).
    record : dict
        What :meth:`save` stores with the weights: base model, objects, settings, the
        held-out IoU before and after, the losses per epoch.
    path : Path or None
        Where it was saved, once saved.
    """

    model: "SamModel | None"
    record: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def cancelled(self) -> bool:
        return self.model is None

    @property
    def iou_before(self) -> float:
        """Mean single-click IoU on the held-out objects with the base decoder."""
        return float(self.record["val_iou_before"])

    @property
    def iou_after(self) -> float:
        """The same with the adapted decoder."""
        return float(self.record["val_iou_after"])

    def summary(self) -> str:
        if self.cancelled:
            return "adaptation cancelled: the base model is unchanged, nothing was saved"
        r = self.record
        where = f"; saved to {self.path}" if self.path else ""
        return (f"adapted the mask decoder on {r['objects']['train']} objects "
                f"({r['objects']['val']} held out) in {r['seconds']:.0f} s, best epoch "
                f"{r['best_epoch']} of {len(r['history']) - 1}: held-out single-click IoU "
                f"{self.iou_before:.3f} -> {self.iou_after:.3f}{where}")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the adapted model as a checkpoint (atomically); an existing file is kept
        unless ``overwrite``. The model then names this file (its hash and path), as it
        would when loaded from it."""
        import torch

        from ..models.download import file_digests
        from ..models.loading import cache_dir

        if self.model is None:
            raise InvalidInputError("the adaptation was cancelled: there is no model to save")
        path = Path(path)
        if path.exists() and not overwrite:
            raise InvalidInputError(f"{str(path)!r} exists; choose another file or pass "
                                    "overwrite=True")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        state = {k: v.detach().cpu() for k, v in self.model.sam.state_dict().items()}
        try:
            torch.save({"model_state": state, "napari_sam": self.record}, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.model.checkpoint_sha256 = file_digests(path, index_dir=cache_dir())["sha256"]
        self.model.checkpoint_path, self.model.name = path, path.name
        self.path = path
        return path


# ---------------------------------------------------------------------- training set
def objects_from_labels(stack: Any, labels: Any, *, indices: Sequence[int] | None = None,
                        min_area: int = 16) -> list[TrainingObject]:
    """Every label of every slice of ``labels`` (the stack's label shape: the image's
    shape without channels) as an object, slice by slice; labels smaller than
    ``min_area`` pixels on a slice are left out. ``indices``: only these slices."""
    check_labels_shape(labels, stack)
    out = []
    for i in range(len(stack)) if indices is None else indices:
        page = np.asarray(labels[tuple(stack.position(int(i)))])
        if page.any():
            out += [TrainingObject(int(i), m, k) for k, m in label_masks(page, min_area=min_area)]
    return out


# ---------------------------------------------------------------------- adapt
def adapt(model: Any, stack: Any, labels: Any, *, slices: Sequence[int] | None = None,
          cache: "str | os.PathLike | None" = "auto", out: "str | os.PathLike | None" = None,
          overwrite: bool = False, min_area: int = 16, epochs: int = 20, lr: float = 3e-4,
          loss: str = "balanced", val_fraction: float = 0.25, patience: int = 4,
          rounds: int = 2, box_fraction: float = 0.5, batch_size: int = 1, seed: int = 0,
          progress: Progress | None = None,
          should_stop: Callable[[], bool] | None = None) -> AdaptResult:
    """Fine-tune a model's mask decoder on the objects of a labels image.

    Parameters
    ----------
    model : SamModel, str or path
        The base model (anything :func:`napari_sam.load_model` takes), never changed.
    stack : Stack, array or path
        The image the labels belong to (anything :func:`napari_sam.open_stack` takes).
    labels : path or array
        A labels file (OME-Zarr labels or TIFF, e.g. the widget's ``cells.labels.ome.zarr``)
        or an integer array of the stack's label shape. Every label of every slice is an
        object (at least 4: some are held out).
    slices : sequence of int, optional
        Only the objects of these slices (stack indices).
    cache : path, "auto" or None
        The embedding store to read and fill ("auto": the one beside the image, if any).
    out : path, optional
        Save the adapted model here (a ``.pth`` checkpoint).
    overwrite : bool
        Replace an existing ``out``.
    min_area : int
        Labels smaller than this (pixels on a slice) are left out.
    epochs, lr : int, float
        At most ``epochs`` passes over the training objects (AdamW at ``lr``).
    loss : {"balanced", "sam"}
        The mask loss (:func:`napari_sam.workflows.training.losses`); dice and the IoU
        head's squared error are always added.
    val_fraction : float
        Share of the objects held out for validation (at least one object).
    patience : int
        Stop after this many epochs without a lower validation loss (the best is kept).
    rounds : int
        Prompts per object and epoch: the first one and ``rounds - 1`` corrections.
    box_fraction : float
        Share of first prompts that are boxes (the rest are single clicks).
    batch_size : int
        Objects per optimiser step.
    seed : int
        Seeds the split, the prompts and the order: the same call gives the same model.
    progress : callable(done, total, info), optional
        After each optimiser step (see ``Progress``).
    should_stop : callable() -> bool, optional
        Polled between steps; True cancels: no model, nothing saved.

    Returns
    -------
    AdaptResult
    """
    from ..engine.segment import Segmenter
    from ..io.stacks import SliceSource, open_stack

    settings = AdaptSettings(epochs=epochs, lr=lr, loss=loss, val_fraction=val_fraction,
                             patience=patience, rounds=rounds, box_fraction=box_fraction,
                             batch_size=batch_size, seed=seed)
    settings.check()
    if out is not None and Path(out).exists() and not overwrite:
        raise InvalidInputError(f"{os.fspath(out)!r} exists; choose another file or pass "
                                "overwrite=True (--overwrite)")
    stack = stack if isinstance(stack, SliceSource) else open_stack(stack)
    source: dict[str, Any] = {"image": str(getattr(stack, "path", "") or "") or None}
    if isinstance(labels, (str, os.PathLike)):
        from ._tasks import read_labels

        path = os.fspath(labels)
        if not os.path.exists(path):
            raise InvalidInputError(f"labels file {path!r} does not exist")
        source.update(labels=str(Path(path).resolve()), provenance=_provenance_summary(path))
        labels = read_labels(path)
    objects = objects_from_labels(stack, labels, indices=slices, min_area=min_area)
    seg = Segmenter(model, stack, cache=cache)
    res = adapt_objects(seg, objects, settings=settings, source=source, progress=progress,
                        should_stop=should_stop)
    if out is not None and not res.cancelled:
        res.save(out, overwrite=overwrite)
    return res


def _provenance_summary(path: str) -> dict | None:
    """How the labels' objects were made (counts by source, models), if recorded."""
    from ..io.provenance import load_records

    try:
        records = load_records(path)
    except Exception:  # noqa: BLE001 - labels from other tools have none; not an error
        return None
    if not records:
        return None
    sources: dict[str, int] = {}
    for r in records:
        sources[r.get("source") or "?"] = sources.get(r.get("source") or "?", 0) + len(r.get("label_ids", []))
    models = sorted({(r.get("model") or {}).get("checkpoint_sha256") or "?" for r in records})
    return {"records": len(records), "objects_by_source": sources, "models": models}


def adapt_objects(seg: "Segmenter", objects: Sequence[TrainingObject], *,
                  settings: AdaptSettings | None = None, source: dict | None = None,
                  progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> AdaptResult:
    """Fine-tune the mask decoder of ``seg.model`` on ``objects`` (the module's docs);
    ``seg`` serves every embedding. :func:`adapt` opens the files and calls this."""
    import torch

    from ..engine.segment import Segmenter

    s = settings or AdaptSettings()
    s.check()
    if not isinstance(seg, Segmenter):
        raise InvalidInputError(
            f"adapting needs whole-slice embeddings (a Segmenter), got {type(seg).__name__}: "
            "slices larger than the tiling threshold are segmented on tiles; set the "
            "threshold to 0 (widget: Settings > Tile above px; CLI: --tile-above 0) to adapt")
    model = seg.model
    objects = list(objects)
    if len(objects) < 4:
        raise InvalidInputError(f"adapting needs at least 4 objects (some are held out for "
                                f"validation), got {len(objects)}: commit more objects first")
    rng = np.random.default_rng(s.seed)
    order = rng.permutation(len(objects))
    n_val = min(len(objects) - 1, max(1, int(round(s.val_fraction * len(objects)))))
    val = [objects[i] for i in order[:n_val]]
    train = [objects[i] for i in order[n_val:]]
    t_start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        decoder = copy.deepcopy(model.sam.mask_decoder).train()
        for p in decoder.parameters():
            p.requires_grad_(True)
        trainer = DecoderTrainer(model, decoder, seg, loss=s.loss)
        outcome = _train(trainer, train, val, s, rng, progress, should_stop)
    if outcome is None:
        return AdaptResult(None, {"stopped": "cancelled"})
    history, best_state, best_epoch, stopped = outcome
    decoder.load_state_dict(best_state)
    decoder.eval()
    for p in decoder.parameters():
        p.requires_grad_(False)
    adapted = with_decoder(model, decoder)
    before, after = single_click_iou(model, seg, val), single_click_iou(adapted, seg, val)
    record = _record(model, s, train, val, history, best_epoch, stopped, before, after, source)
    record["seconds"] = time.perf_counter() - t_start
    adapted.adaptation = record
    return AdaptResult(adapted, record)


def _train(trainer: DecoderTrainer, train: list, val: list, s: AdaptSettings,
           rng: np.random.Generator, progress: Progress | None,
           should_stop: Callable[[], bool] | None):
    """The epochs; (history, best state, best epoch, why it stopped), or None if cancelled."""
    import torch

    decoder = trainer.decoder
    opt = torch.optim.AdamW(decoder.parameters(), lr=s.lr, weight_decay=1e-4)

    def val_loss() -> float:
        decoder.eval()
        with torch.no_grad():
            v = float(np.mean([float(trainer.episode(o, None, rounds=s.rounds, box_fraction=0.0))
                               for o in val]))
        decoder.train()
        return v

    best_loss = val_loss()
    best_state, best_epoch, since = copy.deepcopy(decoder.state_dict()), 0, 0
    history: list[dict] = [{"epoch": 0, "train_loss": None, "val_loss": best_loss}]
    steps_per_epoch = -(-len(train) // s.batch_size)
    total, done, stopped = s.epochs * steps_per_epoch, 0, "epochs"
    for epoch in range(1, s.epochs + 1):
        t0, losses = time.perf_counter(), []
        perm = rng.permutation(len(train))
        for start in range(0, len(train), s.batch_size):
            if should_stop is not None and should_stop():
                return None
            opt.zero_grad()
            batch = [train[i] for i in perm[start:start + s.batch_size]]
            loss = sum(trainer.episode(o, rng, rounds=s.rounds, box_fraction=s.box_fraction)
                       for o in batch) / len(batch)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            done += 1
            if progress is not None:
                progress(done, total, {"epoch": epoch, "epochs": s.epochs,
                                       "loss": float(np.mean(losses)),
                                       "val_loss": history[-1]["val_loss"], "end_of_epoch": False})
        vl = val_loss()
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": vl,
                        "seconds": time.perf_counter() - t0})
        if progress is not None:
            progress(done, total, {"epoch": epoch, "epochs": s.epochs, "loss": history[-1]["train_loss"],
                                   "val_loss": vl, "end_of_epoch": True})
        if vl < best_loss - 1e-6:
            best_loss, best_state, best_epoch, since = vl, copy.deepcopy(decoder.state_dict()), epoch, 0
        else:
            since += 1
            if since >= s.patience:
                stopped = "patience"
                break
    return history, best_state, best_epoch, stopped


def _record(model: "SamModel", s: AdaptSettings, train: list, val: list, history: list,
            best_epoch: int, stopped: str, before: list, after: list, source: dict | None) -> dict:
    from napari_sam import __version__

    return {
        "format": "napari-sam-adaptation", "version": 1,
        "base_model": model.name,
        "base_checkpoint_sha256": model.embedding_signature()["checkpoint_sha256"],
        "base_model_sha256": model.checkpoint_sha256, "encoder_unchanged": True,
        "trained": ["mask_decoder"],
        "objects": {"train": len(train), "val": len(val),
                    "train_objects": [[o.index, o.label_id] for o in train],
                    "val_objects": [[o.index, o.label_id] for o in val]},
        "settings": asdict(s), "best_epoch": best_epoch, "stopped": stopped, "history": history,
        "val_iou_before": float(np.mean(before)), "val_iou_after": float(np.mean(after)),
        "val_ious_before": [float(v) for v in before], "val_ious_after": [float(v) for v in after],
        "source": dict(source or {}), "time": now(), "napari_sam_version": __version__,
    }


def with_decoder(model: "SamModel", decoder: Any) -> "SamModel":
    """A SamModel sharing ``model``'s image and prompt encoders, with ``decoder``."""
    from segment_anything.modeling import Sam

    from ..models.checkpoint import state_dict_sha256
    from ..models.sam import SamModel

    base = model.sam
    sam = Sam(image_encoder=base.image_encoder, prompt_encoder=base.prompt_encoder,
              mask_decoder=decoder, pixel_mean=base.pixel_mean.flatten().tolist(),
              pixel_std=base.pixel_std.flatten().tolist()).to(model.device).eval()
    return SamModel(sam, model.architecture, state_dict_sha256(sam.state_dict()),
                    f"{model.name}+adapted", model.device, None)

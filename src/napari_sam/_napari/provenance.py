"""What the widget made, recorded (:mod:`napari_sam.io.provenance`): every commit and tool run.

Records go into the labels layer's ``metadata["napari_sam_provenance"]`` (so napari's
save, through the plugin's writer, stores them with the labels) and, when the labels
layer is saved automatically (:mod:`.autosave`), into its file at once.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Sequence

from ..workflows.records import record, step

if TYPE_CHECKING:  # pragma: no cover
    from .controller import Answer, SamController

__all__ = ["KEY", "commit_records", "keep", "tool_record"]

KEY = "napari_sam_provenance"
_commits = itertools.count(1)


def _image_path(ctrl: "SamController") -> str | None:
    settings = ctrl.settings()
    return None if settings is None else settings.source_path


def commit_records(ctrl: "SamController", ans: "Answer", painted: Sequence[int | None]) -> list[dict]:
    """One record per committed object: its chain of prompt steps and the mask kept."""
    seg = ctrl.session.current(ans.request.settings)
    commit = next(_commits)
    out = []
    for k, label_id in enumerate(painted):
        if label_id is None:
            continue
        prompt = ans.request.objects[k]
        chain = ans.request.chains[k] if ans.request.chains else ()
        last = step(prompt.with_mask_input(None), refine=prompt.mask_input is not None,
                    mask=ans.chosen[k])
        out.append(record(seg, label_ids=[label_id], source="box" if prompt.box is not None
                          else "click", position=ans.request.position, steps=[*chain, last],
                          params={"overwrite": ctrl.overwrite, "commit": commit,
                                  "order": k}, image_path=_image_path(ctrl)))
    return out


def tool_record(ctrl: "SamController", **kw: Any) -> dict:
    """A record of a tool run (propagation, segment everything, refinement)."""
    return record(ctrl.segmenter, image_path=_image_path(ctrl), **kw)


def keep(ctrl: "SamController", layer: Any, records: Sequence[dict]) -> None:
    """Attach records to the labels layer (and write them, when it is saved automatically)."""
    if not records:
        return
    meta = layer.metadata
    meta[KEY] = [*meta.get(KEY, []), *records]
    autosave = getattr(ctrl, "autosave", None)
    if autosave is not None:
        autosave.records_added(records)

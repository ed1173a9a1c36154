"""The volume-tool actions of the dock widget (a mixin of :class:`~.widget.SamWidget`).

Each action plans the tool on the GUI thread (:mod:`.tools`), runs it as a
:class:`~.workers.Job` with progress and Cancel, and writes its result as one step of the
labels layer's history.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import tools
from .workers import Job

__all__ = ["ToolActions"]


class ToolActions:
    """Propagate, segment everything, refine a label, precompute, adapt; Cancel."""

    def _axis_range(self) -> tuple[int | None, int, int]:
        return self.axis.value, int(self.from_spin.value), int(self.to_spin.value)

    def propagate(self) -> Job | None:
        """Propagate the chosen label (0: the last committed), or every label of the slice in
        view, along the chosen axis."""
        axis, lo, hi = self._axis_range()
        opts = {"axis": axis or 0, "lo": lo, "hi": hi, "min_score": float(self.propagate_score.value),
                "min_iou": float(self.propagate_iou.value)}
        if self.every_label.value:
            return self._run_tool(lambda: tools.propagate_all(self.ctrl, **opts))
        return self._run_tool(lambda: tools.propagate(self.ctrl, label_id=int(self.label_id.value),
                                                      **opts))

    def segment_everything(self) -> Job | None:
        """Segment everything on the slice in view, or on the range when ticked."""
        axis, lo, hi = self._axis_range()
        on_range = bool(self.everything_range.value) and axis is not None
        return self._run_tool(lambda: tools.everything(
            self.ctrl, axis=axis if on_range else None, lo=lo, hi=hi,
            points_per_side=int(self.everything_points.value),
            pred_iou_thresh=float(self.everything_score.value),
            stability_score_thresh=float(self.everything_stability.value)))

    def refine_label(self) -> Job | None:
        """Refine the chosen label, or every label, on the slice in view."""
        if self.every_label.value:
            return self._run_tool(lambda: tools.refine_all(self.ctrl))
        return self._run_tool(lambda: tools.refine(self.ctrl, label_id=int(self.label_id.value)))

    def precompute(self) -> Job | None:
        """Embed the slices of the range into the cache (and store)."""
        axis, lo, hi = self._axis_range()
        return self._run_tool(lambda: tools.precompute(self.ctrl, axis=axis, lo=lo, hi=hi))

    def adapt_model(self, settings: Any = None) -> Job | None:
        """Fine-tune the mask decoder on the labels made so far and segment with it
        (:mod:`.adapt_action`); ``settings``: an ``AdaptSettings`` (default: its defaults)."""
        from . import adapt_action

        return self._run_tool(lambda: adapt_action.adapt(self.ctrl, use_model=self.set_model,
                                                         settings=settings))

    def _run_tool(self, plan: Callable[[], tools.ToolRun]) -> Job | None:
        if self.job is not None and self.job.running:
            self.messages.status("Another tool is running: wait for it, or Cancel it.")
            return None
        run = self._guard(plan)
        if run is None:
            return None

        def done(value: Any) -> None:
            self.messages.status(self._guard(lambda: run.apply(value)) or "")

        def finished() -> None:
            self.messages.busy(False)
            if job.cancelled:
                self.messages.status(f"{run.title}: cancelled, nothing was changed.")

        self.job = job = Job(run.job, on_progress=self.messages.progress, on_done=done,
                             on_error=self.messages.error, on_finished=finished)
        self.job.running = True  # Cancel shows from the start
        self.messages.busy(True, run.title)
        return self.job.start(synchronous=self.synchronous)

    def cancel(self) -> None:
        """Stop the running tool after its current step (slice, training step): nothing of it
        is written."""
        if self.job is not None and self.job.running:
            self.job.cancel()
            self.messages.status("Cancelling after the current step ...")
        seg = self.ctrl.segmenter
        if seg is not None:
            seg.cancel_prefetch()

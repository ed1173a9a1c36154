"""Speed paths for SAM's image encoder (and the switch for the fast mask decoder).

What runs is :mod:`napari_sam.models._vit` (encoder) and :mod:`napari_sam.models._decoder`
(mask decoder); this module holds the configuration. :class:`SpeedConfig` also switches
the mask decoder's fast path (``fast_decoder``), which runs its image side in the same
precision as the encoder's ``autocast``.

The reference path is ``sam.image_encoder(sam.preprocess(x))`` in float32, exactly as
``segment_anything.SamPredictor``. The fast path runs the *same* modules and weights
through a functional re-implementation of ``ImageEncoderViT.forward``
(:mod:`napari_sam.models._vit`) that

* computes each block's attention with the decomposed relative-position bias folded in
  (``fused_attention``): on the CPU into the queries and keys (global blocks through
  ``torch.nn.functional.scaled_dot_product_attention`` without a mask, windows as batched
  matmuls), on GPUs as SDPA's additive mask; the residual stream is kept contiguous;
* optionally runs under ``torch.autocast`` in bfloat16 / float16 (``autocast``); the
  residual stream, the layer norms of the neck and the returned features stay float32;
* optionally wraps that function in ``torch.compile`` (``compile``).

Nothing is patched: neither the ``segment_anything`` classes nor the given ``Sam`` are
changed, no weights are copied, and the reference path stays available. Encoders that are
not a stock ``ImageEncoderViT`` (other backbones, subclasses, hooked attention) fall back
to calling the module itself (autocast still applies).

Every fast path can be switched off: ``speed_config(device, mode="off")`` or the
environment variable ``NAPARI_SAM_FAST=0`` gives the reference paths (encoder and decoder).

Examples
--------
>>> cfg = speed_config("cpu")                                   # doctest: +SKIP
>>> [emb] = model.encode([stack.rgb(0)], speed=cfg)              # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .._errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ENV_FAST",
    "OFF",
    "SpeedConfig",
    "cpu_has_fast_bf16",
    "amp_dtype",
    "decoder_dtype",
    "reproducible",
    "resolve_autocast",
    "speed_config",
    "with_batch_size",
]

ENV_FAST = "NAPARI_SAM_FAST"
_AUTOCAST = (None, "bf16", "fp16", "auto")
_MODES = ("auto", "off", "fused", "bf16", "fp16", "compile")
_AMP = {"bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class SpeedConfig:
    """Which speed paths the image encoder uses.

    Attributes
    ----------
    fused_attention : bool
        The fused encoder of :mod:`napari_sam.models._vit`: SAM's decomposed
        relative-position bias folded into the attention's dot product on the CPU (an
        additive SDPA mask on GPUs), a contiguous residual stream. Same math as the
        reference; float32 results agree to float rounding.
    autocast : {None, "bf16", "fp16", "auto"}
        Run the encoder under ``torch.autocast`` in that precision. ``"auto"`` is resolved
        per device by :func:`resolve_autocast`. None: float32.
    compile : bool
        Wrap the encoder function in ``torch.compile`` (first call compiles: tens of
        seconds to minutes).
    batch_size : int
        Slices per encoder call in :func:`encode_batch`.
    fast_decoder : bool
        Run the mask decoder as :class:`napari_sam._decoder.FastDecoder`: image-side work
        of the first block reused per slice, upscaling as matrix products, image side in
        the ``autocast`` precision (:func:`decoder_dtype`). False: ``sam.mask_decoder``.
    decoder_precision : {"auto", "fp32"}
        "auto": the fast decoder's image side follows ``autocast``. "fp32": float32
        whatever the encoder does; batch jobs use it, because bf16 rounds differently
        with the thread count and the number of prompts per call, and a resumed or
        cluster run must give the same labels as one uninterrupted local run.
    """

    fused_attention: bool = True
    autocast: str | None = "auto"
    compile: bool = False
    batch_size: int = 1
    fast_decoder: bool = True
    decoder_precision: str = "auto"

    def __post_init__(self) -> None:
        if self.autocast not in _AUTOCAST:
            raise InvalidInputError(
                f"autocast must be one of {list(_AUTOCAST)}, got {self.autocast!r}"
            )
        if int(self.batch_size) < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.decoder_precision not in ("auto", "fp32"):
            raise InvalidInputError(
                f"decoder_precision must be 'auto' or 'fp32', got {self.decoder_precision!r}"
            )

    @property
    def is_reference(self) -> bool:
        """True when the encoder takes no speed path (the plain float32 encoder)."""
        return not self.fused_attention and self.autocast is None and not self.compile


OFF = SpeedConfig(fused_attention=False, autocast=None, compile=False, fast_decoder=False)


def _env_off() -> bool:
    return os.environ.get(ENV_FAST, "").strip().lower() in ("0", "off", "false", "no")


def cpu_has_fast_bf16() -> bool:
    """True if this CPU has native bfloat16 matmul (AVX512_BF16 or AMX).

    On such CPUs a bf16 matmul measured 3-4x faster than float32 (see
    ``benchmarks/RESULTS.md``); without them bf16 is emulated and not faster.
    """
    import torch

    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, name, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # noqa: BLE001, S110 - a private torch API changed: ask the next one
            pass
    try:
        capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # noqa: BLE001 - no capability string: assume no native bf16
        return False
    return "BF16" in capability or "AMX" in capability


def resolve_autocast(device: "str | torch.device", autocast: str | None) -> str | None:
    """The precision ``autocast`` means on ``device``: None, "bf16" or "fp16".

    ``"auto"``: CUDA -> bf16 where supported, else fp16; CPU -> bf16 when
    :func:`cpu_has_fast_bf16`, else None; any other device -> None.
    """
    import torch

    if autocast != "auto":
        return autocast
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dev.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else None
    return None


def decoder_dtype(device: "str | torch.device", config: SpeedConfig) -> "torch.dtype":
    """Precision of the fast decoder's image side: float32 with ``decoder_precision="fp32"``,
    else ``config.autocast`` resolved for ``device``."""
    import torch

    if config.decoder_precision == "fp32":
        return torch.float32
    return amp_dtype(device, config.autocast) or torch.float32


def amp_dtype(device: "str | torch.device", autocast: str | None) -> "torch.dtype | None":
    """The torch dtype ``autocast`` means on ``device`` (None: float32, no autocast)."""
    import torch

    mode = resolve_autocast(device, autocast)
    return getattr(torch, _AMP[mode]) if mode else None


def speed_config(device: "str | torch.device", *, mode: str = "auto") -> SpeedConfig:
    """The speed paths to use on ``device``.

    Parameters
    ----------
    device : str or torch.device
        Where the encoder runs.
    mode : {"auto", "off", "fused", "bf16", "fp16", "compile"}
        ``"auto"``: fused attention, autocast chosen per device (see
        :func:`resolve_autocast`), batch size 4 on CUDA and 1 elsewhere, no compile.
        ``"off"``: the reference path. ``"fused"``: fused attention in float32 only.
        ``"bf16"`` / ``"fp16"``: fused attention and that autocast. ``"compile"``: auto
        plus ``torch.compile``. ``$NAPARI_SAM_FAST=0`` forces ``"off"``.

    Returns
    -------
    SpeedConfig
        With ``autocast`` already resolved for the device (never ``"auto"``).
    """
    import torch

    if mode not in _MODES:
        raise InvalidInputError(f"mode must be one of {list(_MODES)}, got {mode!r}")
    if mode == "off" or _env_off():
        return OFF
    dev = torch.device(device)
    batch = 4 if dev.type == "cuda" else 1
    if mode == "fused":
        return SpeedConfig(fused_attention=True, autocast=None, batch_size=batch)
    if mode in ("bf16", "fp16"):
        return SpeedConfig(fused_attention=True, autocast=mode, batch_size=batch)
    return SpeedConfig(
        fused_attention=True,
        autocast=resolve_autocast(dev, "auto"),
        compile=mode == "compile",
        batch_size=batch,
    )


def with_batch_size(config: SpeedConfig, batch_size: int) -> SpeedConfig:
    """``config`` with another ``batch_size``."""
    return replace(config, batch_size=int(batch_size))


def reproducible(config: SpeedConfig) -> SpeedConfig:
    """``config`` for batch jobs: the same encoder, the decoder's image side in float32.

    Labels then do not depend on the thread count or on how prompts are grouped per call
    (see ``decoder_precision``); decoding is a small share of a batch job's time.
    """
    return replace(config, decoder_precision="fp32")

"""Registry of downloadable SAM checkpoints (re-exported by :mod:`napari_sam.models`).

Sources of the published digests
--------------------------------
* Official SAM checkpoints (Meta): SHA-256 as listed, together with these URLs, in
  micro-sam's pooch registry (``micro_sam/util.py``, 2023 versions).
* micro-sam fine-tunes (light / electron microscopy): the current bioimage.io releases
  (``.../1.2/files/vit_*.pt``) with the **xxh128** digests from micro-sam's registry
  (``micro_sam/util.py`` ``models()``); micro-sam publishes no SHA-256 for them, so they
  are verified with the optional ``xxhash`` package.
* Left out: ``vit_t*`` (MobileSAM, not a SAM ViT), micro-sam's histopathology and medical
  imaging models (not microscopy, hosted on owncloud links), their instance-segmentation
  decoders (not SAM weights), and the superseded 2023 zenodo fine-tunes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelSpec", "REGISTRY"]


@dataclass(frozen=True)
class ModelSpec:
    """A downloadable checkpoint: where it lives and how to check it.

    ``sha256`` is the published SHA-256 of the file, or ``""`` where only another digest
    is published; ``xxh128`` is then set (micro-sam publishes xxh128 digests, verified
    with the optional ``xxhash`` package).
    """

    name: str
    url: str
    sha256: str
    architecture: str
    description: str
    filename: str
    xxh128: str = ""

    @property
    def checksum(self) -> tuple[str, str]:
        """``(algorithm, hex digest)`` used to verify the file."""
        return ("sha256", self.sha256) if self.sha256 else ("xxh128", self.xxh128)


def _spec(name: str, url: str, arch: str, desc: str, filename: str, *, sha256: str = "",
          xxh128: str = "") -> ModelSpec:
    return ModelSpec(name, url, sha256, arch, desc, filename, xxh128)


_FB = "https://dl.fbaipublicfiles.com/segment_anything/"
_BIO = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/"

REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec("vit_b", _FB + "sam_vit_b_01ec64.pth", "vit_b", "SAM ViT-B (Meta, 375 MB)",
              "sam_vit_b_01ec64.pth",
              sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
        _spec("vit_l", _FB + "sam_vit_l_0b3195.pth", "vit_l", "SAM ViT-L (Meta, 1.2 GB)",
              "sam_vit_l_0b3195.pth",
              sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
        _spec("vit_h", _FB + "sam_vit_h_4b8939.pth", "vit_h", "SAM ViT-H (Meta, 2.5 GB)",
              "sam_vit_h_4b8939.pth",
              sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
        _spec("vit_b_lm", _BIO + "diplomatic-bug/1.2/files/vit_b.pt", "vit_b",
              "micro-sam ViT-B fine-tuned for light microscopy", "micro_sam_vit_b_lm.pt",
              xxh128="fe9252a29f3f4ea53c15a06de471e186"),
        _spec("vit_l_lm", _BIO + "idealistic-rat/1.2/files/vit_l.pt", "vit_l",
              "micro-sam ViT-L fine-tuned for light microscopy", "micro_sam_vit_l_lm.pt",
              xxh128="017f20677997d628426dec80a8018f9d"),
        _spec("vit_b_em_organelles", _BIO + "noisy-ox/1.2/files/vit_b.pt", "vit_b",
              "micro-sam ViT-B fine-tuned for electron microscopy (organelles)",
              "micro_sam_vit_b_em_organelles.pt", xxh128="f3bf2ed83d691456bae2c3f9a05fb438"),
        _spec("vit_l_em_organelles", _BIO + "humorous-crab/1.2/files/vit_l.pt", "vit_l",
              "micro-sam ViT-L fine-tuned for electron microscopy (organelles)",
              "micro_sam_vit_l_em_organelles.pt", xxh128="810b084b6e51acdbf760a993d8619f2d"),
    )
}


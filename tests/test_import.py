"""``import napari_sam`` stays light: no torch, napari or Qt until they are needed."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "segment_anything", "napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui")


def _loaded_after(code: str) -> list[str]:
    script = code + (
        "\nimport sys, json\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_napari_sam_loads_no_heavy_modules():
    assert _loaded_after("import napari_sam; napari_sam.__all__; dir(napari_sam)") == []


def test_models_and_registry_are_light():
    code = (
        "import napari_sam as ns\n"
        "from napari_sam import models\n"
        "assert 'vit_b' in ns.list_models() and ns.REGISTRY['vit_b'].architecture == 'vit_b'\n"
        "ns.default_model_name(); models.cache_dir(); ns.Architecture(32, 2, 2, (1,)).name\n"
        "import napari_sam.testing\n"
    )
    assert _loaded_after(code) == []

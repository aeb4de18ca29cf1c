"""The dependency floors in pyproject.toml are versions the code really works with.

A floor below what the code needs breaks only the installs that resolve an old release (an
existing environment, a lock file, a resolver that prefers lowest versions), never the fresh
install the rest of the suite runs in. So this test installs the floors themselves from PyPI
into a scratch folder and runs the code paths that touch version-specific API against them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
REPO = Path(__file__).resolve().parents[1]
# The pure-Python-facing libraries whose API the core calls directly (torch is pinned exactly).
CHECKED = ("transformers", "safetensors", "pillow", "numpy")
NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "ProxyError",
    "ConnectTimeoutError",
)

# Runs with only the floors (and what they require) ahead of the project's environment: builds
# the embedded model and its image processor, saves and loads a model version, reads the saved
# processor back as a base model folder, decodes PNG, JPEG and 16-bit images, uses the pixel
# cache, and runs a forward pass and the backbone features linear_probe trains on.
FLOOR_CHECK = """
import io, json, sys, tempfile
from importlib.metadata import version
from pathlib import Path

expected = json.loads(sys.argv[1])
found = {name: version(name) for name in expected}
assert found == expected, f"the floors are not what was imported: {found} != {expected}"

import numpy as np
import torch
from PIL import Image

from mri_assets.core.images import decode_image
from mri_assets.core.inference import pooled_features
from mri_assets.core.labels import ClassSpec
from mri_assets.core.model import load_base_model, preprocess_pixels, weights_fingerprint
from mri_assets.core.phantoms import encode_image, generate_slice
from mri_assets.core.pixel_cache import PixelCache
from mri_assets.core.store import ModelStore

root = Path(tempfile.mkdtemp())
base = load_base_model("embedded", ClassSpec(), root / "base")
store = ModelStore(root / "models")
version_id = store.save_version(base.model, base.preprocessing, {"base_model": "embedded"})
model, preprocessing = store.load_version(version_id)
assert preprocessing == base.preprocessing, (preprocessing, base.preprocessing)
assert weights_fingerprint(model) == weights_fingerprint(base.model)
from_folder = load_base_model(str(store.version_path(version_id)), ClassSpec(), root / "base")
assert from_folder.preprocessing == preprocessing, (from_folder.preprocessing, preprocessing)

scan = generate_slice(np.random.default_rng(0), "glioma", 64)
decoded = [decode_image(encode_image(scan, jpeg=jpeg)) for jpeg in (False, True)]
sixteen = io.BytesIO()
Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(sixteen, "PNG")
decoded.append(decode_image(sixteen.getvalue()))
assert [d.pixels.shape for d in decoded] == [(64, 64, 3)] * 3
assert decoded[2].pixels.max() == 255  # the 16-bit range was stretched, not clipped

cache = PixelCache(root / "pixels")
cache.put(decoded[0].sha256, decoded[0].pixels)
assert (PixelCache(root / "pixels").get(decoded[0].sha256) == decoded[0].pixels).all()

batch = preprocess_pixels([d.pixels for d in decoded], preprocessing)
with torch.no_grad():
    assert model(pixel_values=batch).logits.shape == (3, 2)
    assert pooled_features(model, batch).shape[0] == 3
print("floors ok")
"""


def declared_floors() -> dict[str, str]:
    """The ``>=`` floor of each CHECKED library in [project].dependencies."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for line in dependencies:
        requirement = Requirement(line)
        name = requirement.name.lower()
        for spec in requirement.specifier:
            if spec.operator == ">=" and name in CHECKED:
                floors[name] = spec.version
    return floors


def test_every_checked_library_has_a_floor() -> None:
    assert sorted(declared_floors()) == sorted(CHECKED)


@pytest.mark.slow
def test_the_code_works_with_the_declared_dependency_floors(tmp_path: Path) -> None:
    floors = declared_floors()
    target = tmp_path / "floors"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--only-binary=:all:",
            # No .pyc for thousands of modules the check never imports (transformers alone).
            "--no-compile",
            "--target",
            str(target),
            *(f"{name}=={floor}" for name, floor in sorted(floors.items())),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if install.returncode != 0 and any(e in install.stderr for e in NETWORK_ERRORS):
        pytest.skip(f"PyPI is not reachable: {install.stderr.strip().splitlines()[-1]}")
    errors = "\n".join(line for line in install.stderr.splitlines() if "is ignored" not in line)
    assert install.returncode == 0, (
        f"the floors {floors} in pyproject.toml cannot be installed together on Python "
        f"{sys.version_info.major}.{sys.version_info.minor} (raise the one pip names):\n"
        + errors[-3000:]
    )
    installed = {name: _installed_version(target, name) for name in floors}

    check = subprocess.run(
        [sys.executable, "-c", FLOOR_CHECK, json.dumps(installed)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            # The floors first, then this working tree, then the project's environment.
            "PYTHONPATH": os.pathsep.join([str(target), str(REPO)]),
            "PYTHONNOUSERSITE": "1",
            "HF_HUB_OFFLINE": "1",  # the embedded model only: nothing may come from the hub
        },
    )
    assert check.returncode == 0 and "floors ok" in check.stdout, (
        f"the code fails with the dependency floors of pyproject.toml {installed}; raise the "
        f"floor of the library in the traceback, or make the code work with it:\n"
        + check.stderr[-4000:]
    )


def _installed_version(target: Path, name: str) -> str:
    """The version pip put into ``target`` for ``name`` (``==4.46`` installs 4.46.0)."""
    for record in target.glob("*.dist-info/METADATA"):
        fields = dict(
            line.split(": ", 1) for line in record.read_text().splitlines()[:10] if ": " in line
        )
        if fields.get("Name", "").lower() == name:
            return fields["Version"]
    raise AssertionError(f"pip did not install {name} into {target}")

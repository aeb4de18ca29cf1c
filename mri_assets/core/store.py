"""The model store: immutable model versions on local disk and the record of what is deployed.

Layout under ``root``::

    base/<name>/                 base models (the embedded ResNet), see model.load_base_model
    versions/<version>/          model.safetensors, config.json, preprocessor_config.json,
                                 training_record.json -- complete or absent, never half-written;
                                 optionally arrays.safetensors (named arrays stored with the
                                 model, such as its out-of-distribution statistics)
    deployments.json             the deployment history; its last entry is what is deployed

The store alone says what is deployed, so serving predictions never needs the DuckDB catalog.
torch and transformers are imported only when a model is saved or loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mri_assets.core.files import (
    LEFTOVER_GRACE_SECONDS,
    held_for_writing,
    lock_exclusively,
    remove_if_abandoned,
    replaced_atomically,
    sweep_temp_files,
)
from mri_assets.core.model import (
    PICKLE_PATTERNS,
    PREPROCESSOR_CONFIG,
    Preprocessing,
    quiet_transformers,
    read_preprocessing,
    save_preprocessing,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "training_record.json"
VERSION_FILES = (WEIGHTS_FILE, "config.json", PREPROCESSOR_CONFIG, RECORD_FILE)
ARRAYS_FILE = "arrays.safetensors"  # optional: versions saved before it existed have none
DEPLOYMENTS_FILE = "deployments.json"
_STAGING_PREFIX = ".tmp-"
_STAGING_LOCK = ".writer.lock"  # held by the saving process; removed just before the rename
_CORE_DIR = Path(__file__).resolve().parent

log = logging.getLogger(__name__)


class ModelStoreError(RuntimeError):
    """A store operation that cannot be done as asked (unknown version, nothing to roll back to)."""


class ModelStore:
    """Model versions and deployment history in a local folder (see module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def base_root(self) -> Path:
        """Where base models such as the embedded ResNet are kept (model.load_base_model)."""
        return self.root / "base"

    @property
    def versions_root(self) -> Path:
        return self.root / "versions"

    def version_path(self, version: str) -> Path:
        if not version or "/" in version or version.startswith(".") or version != version.strip():
            raise ModelStoreError(f"not a valid version id: {version!r}")
        return self.versions_root / version

    # --- versions ------------------------------------------------------------------------------

    def save_version(
        self,
        model: PreTrainedModel,
        preprocessing: Preprocessing,
        training_record: dict[str, Any],
        arrays: dict[str, np.ndarray] | None = None,
    ) -> str:
        """Store ``model`` as a new immutable version and return its id.

        Ids look like ``20261124T201500.123456Z-1a2b3c4d`` (UTC time, then the start of the
        weights' sha256): they sort by creation time. The folder is written under a temporary
        name and renamed into place, so a crash leaves either a complete version or none.
        ``training_record`` is stored with ``version``, ``created_at``, ``code_version`` and
        ``weights_sha256`` added. ``arrays`` (named numpy arrays) are written to
        ``arrays.safetensors`` in the same folder, so they appear and vanish with the version.
        Staging folders left by a killed save are swept first (``sweep_leftovers``).
        """
        self.versions_root.mkdir(parents=True, exist_ok=True)
        self.sweep_leftovers()
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.versions_root))
        lock = staging / _STAGING_LOCK
        try:
            with held_for_writing(lock):
                with quiet_transformers():
                    model.save_pretrained(staging)
                save_preprocessing(preprocessing, staging)
                if arrays:
                    _save_arrays(staging / ARRAYS_FILE, arrays)
                _refuse_pickles(staging)  # save_pretrained must have written safetensors only
                weights_sha = _file_sha256(staging / WEIGHTS_FILE)
                now = datetime.now(timezone.utc)
                version = f"{now:%Y%m%dT%H%M%S.%f}Z-{weights_sha[:8]}"
                if self.version_path(version).exists():  # same weights, same microsecond
                    version = f"{version}-{secrets.token_hex(2)}"
                record = {
                    **training_record,
                    "version": version,
                    "created_at": _iso(now),
                    "code_version": code_version(),
                    "weights_sha256": weights_sha,
                }
                _write_json(staging / RECORD_FILE, record)
                # Still locked through the open descriptor; the unlink refreshes the folder's
                # mtime, so the grace period covers the instant until the rename.
                lock.unlink()
                os.rename(staging, self.version_path(version))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return version

    def sweep_leftovers(self, grace_seconds: float = LEFTOVER_GRACE_SECONDS) -> list[Path]:
        """Remove what killed saves left behind: ``versions/.tmp-*`` staging folders whose
        writer is gone and that are older than ``grace_seconds``, and stray temp files of
        ``deployments.json``. A save still running, in any process, is never touched. Returns
        the paths removed (and logs them)."""
        swept = sweep_temp_files(self.root, grace_seconds)
        if self.versions_root.is_dir():
            for staging in sorted(self.versions_root.glob(f"{_STAGING_PREFIX}*")):
                if remove_if_abandoned(staging, staging / _STAGING_LOCK, grace_seconds):
                    swept.append(staging)
        if swept:
            log.warning(
                "removed %d leftover(s) of model saves that were killed: %s",
                len(swept),
                ", ".join(str(p) for p in swept),
            )
        return swept

    def load_version(self, version: str) -> tuple[PreTrainedModel, Preprocessing]:
        """The model (eval mode, float32) and preprocessing of a stored version.

        Reads safetensors only; a version folder holding any pickle-format file is refused.
        """
        import torch
        from transformers import AutoModelForImageClassification

        folder = self._complete_version(version)
        _refuse_pickles(folder)
        with quiet_transformers():
            model = AutoModelForImageClassification.from_pretrained(
                str(folder), use_safetensors=True, trust_remote_code=False, dtype=torch.float32
            )
        return model.eval(), read_preprocessing(folder)

    def load_arrays(self, version: str) -> dict[str, np.ndarray]:
        """The named arrays stored with ``version`` (empty for a version saved without any)."""
        from safetensors.numpy import load_file

        path = self._complete_version(version) / ARRAYS_FILE
        return load_file(str(path)) if path.is_file() else {}

    def versions(self) -> list[str]:
        """Ids of the complete versions, oldest first."""
        if not self.versions_root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.versions_root.iterdir()
            if not p.name.startswith(".") and _is_complete(p)
        )

    def training_record(self, version: str) -> dict[str, Any]:
        """The JSON training record stored with a version."""
        return json.loads((self._complete_version(version) / RECORD_FILE).read_text())

    def has_version(self, version: str) -> bool:
        try:
            return _is_complete(self.version_path(version))
        except ModelStoreError:
            return False

    def _complete_version(self, version: str) -> Path:
        folder = self.version_path(version)
        if not _is_complete(folder):
            known = ", ".join(self.versions()[-5:]) or "none"
            raise ModelStoreError(
                f"no complete model version {version!r} in {self.versions_root} (latest: {known})"
            )
        return folder

    # --- deployments ---------------------------------------------------------------------------

    def promote(
        self, version: str, auc: float | None, test_set_version: str | None, reason: str
    ) -> dict[str, Any]:
        """Deploy ``version`` (which must be a complete stored version); returns the new entry."""
        self._complete_version(version)
        entry = _entry(version, auc, test_set_version, "promote", reason)
        with self._locked():
            self._write_history([*self.deployment_history(), entry])
        return entry

    def rollback(self, version: str | None = None, reason: str | None = None) -> dict[str, Any]:
        """Deploy again a version that was deployed before; returns the new entry.

        ``version=None`` means the deployment before the current one. Rollbacks walk back through
        promotions: after promoting A, B, C, two rollbacks give B then A (a version rolled away
        from is not returned to by a later ``rollback()``; name it explicitly for that). Raises
        ModelStoreError when nothing is deployed, there is no earlier deployment, or ``version``
        was never deployed or is not a complete stored version.
        """
        with self._locked():
            history = self.deployment_history()
            if not history:
                raise ModelStoreError("nothing is deployed, so there is nothing to roll back")
            current = history[-1]["version"]
            target = self._rollback_target(history, version)
            source = _last_entry_for(history, target)
            entry = _entry(
                target,
                source.get("auc"),
                source.get("test_set_version"),
                "rollback",
                reason or f"rollback from {current} to {target}",
            )
            self._write_history([*history, entry])
        return entry

    def _rollback_target(self, history: list[dict[str, Any]], version: str | None) -> str:
        stack = _deployment_stack(history)
        if version is None:
            if len(stack) < 2:
                raise ModelStoreError(
                    f"no earlier deployment to roll back to: {stack[-1]} is the only one left"
                )
            version = stack[-2]
        elif version == stack[-1]:
            raise ModelStoreError(f"{version} is already the deployed version")
        elif version not in {e["version"] for e in history}:
            why = (
                "was never deployed (promote it instead)"
                if self.has_version(version)
                else "is not a stored version"
            )
            raise ModelStoreError(f"cannot roll back to {version}: it {why}")
        self._complete_version(version)  # deployed once, but its folder must still be intact
        return version

    def deployed(self) -> dict[str, Any] | None:
        """The entry of the version deployed now, or None before the first promotion."""
        history = self.deployment_history()
        return history[-1] if history else None

    def deployment_history(self) -> list[dict[str, Any]]:
        """Every promotion and rollback, oldest first."""
        path = self.root / DEPLOYMENTS_FILE
        if not path.exists():
            return []
        history = json.loads(path.read_text())
        if not isinstance(history, list):
            raise ModelStoreError(f"{path} must hold a JSON list of deployments")
        return history

    def _write_history(self, history: list[dict[str, Any]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(self.root / DEPLOYMENTS_FILE, history)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """Serialise read-modify-write of deployments.json across processes."""
        return lock_exclusively(self.root / ".deployments.lock")


def _deployment_stack(history: list[dict[str, Any]]) -> list[str]:
    """Replay the history into the stack of versions a rollback can return to (current last).

    A promotion pushes its version (moving it to the top if already there); a rollback pops back
    down to its target.
    """
    stack: list[str] = []
    for entry in history:
        version = entry["version"]
        if entry.get("action") == "rollback" and version in stack:
            del stack[stack.index(version) + 1 :]
        else:
            stack = [v for v in stack if v != version] + [version]
    return stack


def _last_entry_for(history: list[dict[str, Any]], version: str) -> dict[str, Any]:
    return next(e for e in reversed(history) if e["version"] == version)


def _entry(
    version: str, auc: float | None, test_set_version: str | None, action: str, reason: str
) -> dict[str, Any]:
    return {
        "version": version,
        "auc": None if auc is None else float(auc),
        "test_set_version": test_set_version,
        "deployed_at": _iso(datetime.now(timezone.utc)),
        "action": action,
        "reason": reason,
    }


def code_version() -> str:
    """Package version plus the start of a sha256 over the core source files, e.g. ``0.1.0+3fa2c1d09b12``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("mri-assets")
    except PackageNotFoundError:
        package = "unknown"
    digest = hashlib.sha256()
    for source in sorted(_CORE_DIR.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return f"{package}+{digest.hexdigest()[:12]}"


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in VERSION_FILES)


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        raise ModelStoreError(
            f"{folder} contains pickle-format files ({', '.join(pickles)}); only safetensors "
            "weights are accepted, because unpickling can run arbitrary code"
        )


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(array) for name, array in arrays.items()}, str(path))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def _atomic_write_json(path: Path, payload: Any) -> None:
    """Readers see the old file or the new one; the new one survives a power loss."""
    with replaced_atomically(path, "w") as handle:
        handle.write(json.dumps(payload, indent=2, default=str) + "\n")

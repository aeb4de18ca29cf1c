"""The model store: immutable model versions on local disk and the record of what is deployed.

Layout under ``root``::

    base/<name>/                 base models (the embedded ResNet), see model.load_base_model
    versions/<version>/          model.safetensors, config.json, preprocessor_config.json,
                                 training_record.json -- complete or absent, never half-written;
                                 optionally arrays.safetensors (named arrays stored with the
                                 model, such as its out-of-distribution statistics)
    deployments.json             the deployment history; its last entry is what is deployed

The store alone says what is deployed, so serving predictions never needs the DuckDB catalog.
torch and transformers are imported only when a model is saved or loaded (core/model.py): the
resources build a store when the Dagster definitions load.

With a ``remote`` (MRI_STORE=s3://bucket/prefix, see core/object_store.py) the bucket holds the
truth and ``root`` is only a cache any process may start without::

    models/versions/<version>/<file>    every file of the version folder, whatever it holds
    models/manifests/<version>.json     written last: names, sizes and sha256 of those files
    models/deployments.json             the history, replaced only by a conditional write

A version is published, object by object, before its local folder is renamed into place, and is
visible to others only once its manifest exists; a save killed or cut off halfway leaves objects
no reader looks at. A reader downloads a missing version into ``root`` (checked against the
manifest) before loading it. Two promotions or rollbacks racing each other read the same
history and write it back with ``If-Match`` on its ETag: one wins, the other fails with a
ModelStoreError and changes nothing.
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
from safetensors.numpy import load_file, save_file

from mri_assets.core.files import (
    LEFTOVER_GRACE_SECONDS,
    held_for_writing,
    lock_exclusively,
    remove_if_abandoned,
    replaced_atomically,
    sweep_temp_files,
)
from mri_assets.core.object_store import ObjectStoreError, S3Objects, WriteConflict
from mri_assets.core.preprocessing import PREPROCESSOR_CONFIG, Preprocessing
from mri_assets.core.safe_weights import PICKLE_PATTERNS

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
# Objects of an unpublished version are removed once untouched this long: an upload that is
# still under way writes a file at least this often, however large the model.
UNPUBLISHED_GRACE_SECONDS = 3600.0

log = logging.getLogger(__name__)


class ModelStoreError(RuntimeError):
    """A store operation that cannot be done as asked (unknown version, nothing to roll back to)."""


class ModelStore:
    """Model versions and deployment history in a local folder, or in S3 with that folder as
    its cache (see module docstring)."""

    def __init__(self, root: str | Path, remote: S3Objects | None = None) -> None:
        self.root = Path(root)
        self.remote = remote

    @property
    def location(self) -> str:
        """Where the store's truth lives, for messages: the S3 URL or the local folder."""
        return self.remote.location if self.remote else str(self.root)

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
        # Here, not at the top: the store is built at load time, torch only when a model is saved.
        from mri_assets.core.model import save_model

        self.versions_root.mkdir(parents=True, exist_ok=True)
        self.sweep_leftovers()
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.versions_root))
        lock = staging / _STAGING_LOCK
        try:
            with held_for_writing(lock):
                save_model(model, preprocessing, staging)
                if arrays:
                    _save_arrays(staging / ARRAYS_FILE, arrays)
                _refuse_pickles(staging)  # save_pretrained must have written safetensors only
                weights_sha = _file_sha256(staging / WEIGHTS_FILE)
                now = datetime.now(timezone.utc)
                version = f"{now:%Y%m%dT%H%M%S.%f}Z-{weights_sha[:8]}"
                if self._id_taken(version):  # same weights, same microsecond
                    version = f"{version}-{secrets.token_hex(2)}"
                record = {
                    **training_record,
                    "version": version,
                    "created_at": _iso(now),
                    "code_version": code_version(),
                    "weights_sha256": weights_sha,
                }
                _write_json(staging / RECORD_FILE, record)
                if self.remote is not None:
                    self._publish(staging, version)
                # Still locked through the open descriptor; the unlink refreshes the folder's
                # mtime, so the grace period covers the instant until the rename.
                lock.unlink()
                os.rename(staging, self.version_path(version))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return version

    def _id_taken(self, version: str) -> bool:
        if self.version_path(version).exists():
            return True
        return self.remote is not None and self.remote.exists(_manifest_key(version))

    def _publish(self, folder: Path, version: str) -> None:
        """Upload every file of ``folder`` (any name, any depth), then the manifest that makes
        the version visible. The manifest is written only if absent: a version id is never
        published twice."""
        files = _version_files(folder)
        manifest = {
            "version": version,
            "files": {
                name: {"size": path.stat().st_size, "sha256": _file_sha256(path)}
                for name, path in files.items()
            },
        }
        try:
            for name, path in files.items():
                self.remote.put_file(f"versions/{version}/{name}", path)
            self.remote.put_bytes(
                _manifest_key(version), json.dumps(manifest, indent=2).encode(), if_absent=True
            )
        except ObjectStoreError as error:
            raise ModelStoreError(
                f"could not publish model version {version} to {self.remote.location}: {error}. "
                "Nothing was published (a version is visible only once its manifest is "
                "written, and it was not); run the save again once the store answers"
            ) from error

    def _download(self, version: str) -> bool:
        """Copy a published version into the local cache; False when it is not published."""
        found = self.remote.get_bytes(_manifest_key(version))
        if found is None:
            return False
        files = json.loads(found[0])["files"]
        self.versions_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.versions_root))
        lock = staging / _STAGING_LOCK
        try:
            with held_for_writing(lock):
                for name, expected in sorted(files.items()):
                    if name.startswith("/") or ".." in name.split("/"):
                        raise ModelStoreError(
                            f"the manifest of model version {version} in "
                            f"{self.remote.location} names {name!r}, outside its folder"
                        )
                    target = staging / name
                    if not self.remote.download(f"versions/{version}/{name}", target):
                        raise ModelStoreError(
                            f"model version {version} in {self.remote.location} lacks {name}, "
                            "which its manifest lists; the store was altered outside mri-assets"
                        )
                    if _file_sha256(target) != expected["sha256"]:
                        raise ModelStoreError(
                            f"{name} of model version {version} in {self.remote.location} does "
                            "not match the sha256 its manifest records; the store was altered"
                        )
                _refuse_pickles(staging)
                lock.unlink()
                with contextlib.suppress(OSError):  # another process downloaded it first
                    os.rename(staging, self.version_path(version))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return _is_complete(self.version_path(version))

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
        if self.remote is not None:
            swept += [Path(self.remote.url(k)) for k in self.sweep_unpublished()]
        if swept:
            log.warning(
                "removed %d leftover(s) of model saves that were killed: %s",
                len(swept),
                ", ".join(str(p) for p in swept),
            )
        return swept

    def sweep_unpublished(self, grace_seconds: float = UNPUBLISHED_GRACE_SECONDS) -> list[str]:
        """Remove from the bucket the objects of versions that never got their manifest (a save
        cut off mid-upload), once nothing of that version was written for ``grace_seconds``:
        an upload still under way keeps writing. Returns the keys removed."""
        ages = self._remote_call(self.remote.list_ages, "versions/")
        published = set(self.versions())
        by_version: dict[str, list[str]] = {}
        for key in ages:
            by_version.setdefault(key.split("/", 2)[1], []).append(key)
        leftovers = [
            key
            for version, keys in sorted(by_version.items())
            if version not in published and min(ages[k] for k in keys) > grace_seconds
            for key in keys
        ]
        if leftovers:
            self._remote_call(self.remote.delete, leftovers)
        return leftovers

    def load_version(self, version: str) -> tuple[PreTrainedModel, Preprocessing]:
        """The model (eval mode, float32) and preprocessing of a stored version.

        Reads safetensors only; a version folder holding any pickle-format file is refused.
        """
        # Here, not at the top: the store is built at load time, torch only when a model is read.
        from mri_assets.core.model import load_saved_model

        folder = self._complete_version(version)
        _refuse_pickles(folder)
        return load_saved_model(folder)

    def load_arrays(self, version: str) -> dict[str, np.ndarray]:
        """The named arrays stored with ``version`` (empty for a version saved without any)."""
        path = self._complete_version(version) / ARRAYS_FILE
        return load_file(str(path)) if path.is_file() else {}

    def versions(self) -> list[str]:
        """Ids of the complete versions, oldest first (with a remote: the published ones)."""
        if self.remote is not None:
            return sorted(
                key[len("manifests/") : -len(".json")]
                for key in self._remote_call(self.remote.list_keys, "manifests/")
                if key.endswith(".json")
            )
        if not self.versions_root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.versions_root.iterdir()
            if not p.name.startswith(".") and _is_complete(p)
        )

    def training_record(self, version: str) -> dict[str, Any]:
        """The JSON training record stored with a version (with a remote, a version not cached
        here has only its record fetched, checked against its manifest, not its weights)."""
        folder = self.version_path(version)
        if self.remote is None or _is_complete(folder):
            return json.loads((self._complete_version(version) / RECORD_FILE).read_text())
        return json.loads(self._remote_call(self._fetch_record, version))

    def _fetch_record(self, version: str) -> bytes:
        manifest = self.remote.get_bytes(_manifest_key(version))
        record = self.remote.get_bytes(f"versions/{version}/{RECORD_FILE}")
        if manifest is None or record is None:
            raise ModelStoreError(
                f"no complete model version {version!r} in {self.remote.location}"
            )
        expected = json.loads(manifest[0])["files"].get(RECORD_FILE, {}).get("sha256")
        if hashlib.sha256(record[0]).hexdigest() != expected:
            raise ModelStoreError(
                f"{RECORD_FILE} of model version {version} in {self.remote.location} does not "
                "match the sha256 its manifest records; the store was altered"
            )
        return record[0]

    def has_version(self, version: str) -> bool:
        try:
            folder = self.version_path(version)
        except ModelStoreError:
            return False
        if self.remote is not None:
            return self._remote_call(self.remote.exists, _manifest_key(version))
        return _is_complete(folder)

    def _complete_version(self, version: str) -> Path:
        """The local folder of a complete version, downloaded first when only published."""
        folder = self.version_path(version)
        if _is_complete(folder):
            return folder
        if self.remote is not None and self._remote_call(self._download, version):
            return folder
        known = ", ".join(self.versions()[-5:]) or "none"
        where = self.remote.location if self.remote else self.versions_root
        raise ModelStoreError(f"no complete model version {version!r} in {where} (latest: {known})")

    def _published_version(self, version: str) -> None:
        """Raise unless ``version`` can be deployed: complete here, and published when remote
        (a version only this machine holds must never become what every machine serves)."""
        self._complete_version(version)
        if self.remote is not None and not self.has_version(version):
            raise ModelStoreError(
                f"model version {version} is in the local cache {self.versions_root} but was "
                f"never published to {self.remote.location}; save it again to publish it"
            )

    def _remote_call(self, method, *args):
        try:
            return method(*args)
        except ObjectStoreError as error:
            raise ModelStoreError(f"model store {self.location}: {error}") from error

    # --- deployments ---------------------------------------------------------------------------

    def promote(
        self, version: str, auc: float | None, test_set_version: str | None, reason: str
    ) -> dict[str, Any]:
        """Deploy ``version`` (which must be a complete stored version); returns the new entry.

        Raises ModelStoreError, changing nothing, when another promotion or rollback changed
        the remote history between this one's read and write."""
        self._published_version(version)
        entry = _entry(version, auc, test_set_version, "promote", reason)
        self._update_history(lambda history: entry)
        return entry

    def rollback(self, version: str | None = None, reason: str | None = None) -> dict[str, Any]:
        """Deploy again a version that was deployed before; returns the new entry.

        ``version=None`` means the deployment before the current one. Rollbacks walk back through
        promotions: after promoting A, B, C, two rollbacks give B then A (a version rolled away
        from is not returned to by a later ``rollback()``; name it explicitly for that). Raises
        ModelStoreError when nothing is deployed, there is no earlier deployment, or ``version``
        was never deployed or is not a complete stored version.
        """

        def rollback_entry(history: list[dict[str, Any]]) -> dict[str, Any]:
            if not history:
                raise ModelStoreError("nothing is deployed, so there is nothing to roll back")
            current = history[-1]["version"]
            target = self._rollback_target(history, version)
            source = _last_entry_for(history, target)
            return _entry(
                target,
                source.get("auc"),
                source.get("test_set_version"),
                "rollback",
                reason or f"rollback from {current} to {target}",
            )

        return self._update_history(rollback_entry)

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
        self._published_version(version)  # deployed once, but it must still be intact
        return version

    def deployed(self) -> dict[str, Any] | None:
        """The entry of the version deployed now, or None before the first promotion."""
        history = self.deployment_history()
        return history[-1] if history else None

    def deployment_history(self) -> list[dict[str, Any]]:
        """Every promotion and rollback, oldest first."""
        return self._read_history()[0]

    def _read_history(self) -> tuple[list[dict[str, Any]], str | None]:
        """The history and, with a remote, the ETag of the object it came from (None: absent)."""
        if self.remote is not None:
            found = self._remote_call(self.remote.get_bytes, DEPLOYMENTS_FILE)
            where, raw, etag = self.remote.url(DEPLOYMENTS_FILE), *(found or (None, None))
        else:
            path = self.root / DEPLOYMENTS_FILE
            where, raw, etag = path, path.read_bytes() if path.exists() else None, None
        if raw is None:
            return [], None
        history = json.loads(raw)
        if not isinstance(history, list):
            raise ModelStoreError(f"{where} must hold a JSON list of deployments")
        return history, etag

    def _update_history(self, new_entry) -> dict[str, Any]:
        """Append ``new_entry(history)`` to the history, as one winner among racing writers:
        under a file lock locally, by a conditional write remotely (the loser raises)."""
        if self.remote is None:
            with self._locked():
                history, _ = self._read_history()
                entry = new_entry(history)
                self.root.mkdir(parents=True, exist_ok=True)
                _atomic_write_json(self.root / DEPLOYMENTS_FILE, [*history, entry])
            return entry
        history, etag = self._read_history()
        entry = new_entry(history)
        payload = (json.dumps([*history, entry], indent=2, default=str) + "\n").encode()
        try:
            self.remote.put_bytes(DEPLOYMENTS_FILE, payload, if_match=etag, if_absent=etag is None)
        except WriteConflict as conflict:
            raise ModelStoreError(
                f"the deployment changed while {entry['action']} of {entry['version']} was "
                f"being recorded (another promotion or rollback won): {conflict}. Nothing was "
                "changed by this call; check `mri-assets status` and try again if still wanted"
            ) from conflict
        except ObjectStoreError as error:
            raise ModelStoreError(
                f"could not record the {entry['action']} of {entry['version']}: {error}"
            ) from error
        return entry

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


def _manifest_key(version: str) -> str:
    return f"manifests/{version}.json"


def _version_files(folder: Path) -> dict[str, Path]:
    """Every regular file in a version folder by its relative name, the writer's lock aside."""
    return {
        path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != _STAGING_LOCK
    }


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

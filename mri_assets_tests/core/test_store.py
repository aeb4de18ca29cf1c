"""The model store: immutable versions, deployments, rollbacks, crash safety, pickle refusal."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from mri_assets.core import store as store_module
from mri_assets.core.model import weights_fingerprint
from mri_assets.core.preprocessing import Preprocessing
from mri_assets.core.store import ModelStore, ModelStoreError, code_version

PREPROCESSING = Preprocessing(40, (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
RECORD = {"base_model": "embedded", "data_snapshot": {"sha256": "ab" * 32}}


def tiny_model(seed: int) -> ResNetForImageClassification:
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=2,
        id2label={0: "glioma", 1: "meningioma"},
        label2id={"glioma": 0, "meningioma": 1},
    )
    torch.manual_seed(seed)
    return ResNetForImageClassification(config)


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def save(store: ModelStore, seed: int) -> str:
    return store.save_version(tiny_model(seed), PREPROCESSING, RECORD)


def test_saved_version_loads_back_identically(store: ModelStore) -> None:
    model = tiny_model(0)

    version = store.save_version(model, PREPROCESSING, RECORD)
    loaded, preprocessing = store.load_version(version)

    assert weights_fingerprint(loaded) == weights_fingerprint(model)
    assert preprocessing == PREPROCESSING
    assert not loaded.training
    assert loaded.config.id2label == {0: "glioma", 1: "meningioma"}
    files = sorted(p.name for p in store.version_path(version).iterdir())
    assert files == sorted(store_module.VERSION_FILES)


def test_training_record_gains_version_time_code_and_weights_hash(store: ModelStore) -> None:
    version = save(store, 0)

    record = store.training_record(version)

    assert record["base_model"] == "embedded" and record["data_snapshot"] == RECORD["data_snapshot"]
    assert record["version"] == version
    assert record["created_at"].endswith("Z")
    assert record["code_version"] == code_version()
    assert version.endswith(record["weights_sha256"][:8])


def test_version_ids_are_unique_and_sort_by_creation(store: ModelStore) -> None:
    saved = [save(store, 0), save(store, 0), save(store, 1)]  # the same weights twice, too

    assert len(set(saved)) == 3
    assert store.versions() == saved
    assert all(re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}(-[0-9a-f]{4})?", v) for v in saved)


def test_crash_while_saving_leaves_no_version(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store_module.os, "rename", crash)

    with pytest.raises(OSError, match="disk full"):
        save(store, 0)
    assert store.versions() == []
    assert list(store.versions_root.iterdir()) == []  # the staging folder is gone too


# A real save in another process that stops once the weights are written, before the rename.
STALLED_SAVE = """
import sys, time
from mri_assets.core import store
from mri_assets_tests.core.test_store import PREPROCESSING, RECORD, tiny_model

def stall(path):
    print("writing", flush=True)
    time.sleep(600)

store._file_sha256 = stall
store.ModelStore(sys.argv[1]).save_version(tiny_model(7), PREPROCESSING, RECORD)
"""


def start_stalled_save(root: Path) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", STALLED_SAVE, str(root)], stdout=subprocess.PIPE, text=True, cwd=repo
    )
    ready, _, _ = select.select([child.stdout], [], [], 180)
    if not ready or child.stdout.readline().strip() != "writing":
        child.kill()
        pytest.fail("the saving process never reached the middle of its save")
    return child


def set_age(path: Path, seconds: float) -> None:
    moment = time.time() - seconds
    os.utime(path, (moment, moment))


def test_a_killed_save_is_swept_by_the_next_but_a_live_save_never(
    store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    child = start_stalled_save(store.root)
    try:
        [staging] = store.versions_root.glob(".tmp-*")
        assert (staging / store_module.WEIGHTS_FILE).exists()
        set_age(staging, 3600)  # older than any grace period: only the lock protects it
        first = save(store, 0)
        assert staging.exists()  # the live save in the other process keeps its folder
        assert store.sweep_leftovers() == []
    finally:
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL

    set_age(staging, 0)  # just written: could be a save that has not locked it yet
    assert store.sweep_leftovers() == [] and staging.exists()

    set_age(staging, 120)
    with caplog.at_level(logging.WARNING, logger="mri_assets.core.store"):
        second = save(store, 1)
    assert not staging.exists()
    assert staging.name in caplog.text
    assert sorted(p.name for p in store.versions_root.iterdir()) == [first, second]
    assert store.versions() == [first, second]
    loaded, _ = store.load_version(second)
    assert weights_fingerprint(loaded) == weights_fingerprint(tiny_model(1))


def test_a_staging_folder_killed_before_its_lock_existed_is_swept(store: ModelStore) -> None:
    staging = store.versions_root / ".tmp-killed-early"
    staging.mkdir(parents=True)
    (staging / "config.json").write_text("{}")
    set_age(staging, 120)

    assert store.sweep_leftovers() == [staging]
    assert not staging.exists()


def test_code_version_names_package_and_source_hash() -> None:
    assert re.fullmatch(r".+\+[0-9a-f]{12}", code_version())


def test_promote_records_the_deployment(store: ModelStore) -> None:
    version = save(store, 0)
    assert store.deployed() is None

    entry = store.promote(version, auc=0.97, test_set_version="t1", reason="beats baseline")

    assert store.deployed() == entry
    assert entry["version"] == version and entry["action"] == "promote"
    assert entry["auc"] == 0.97 and entry["test_set_version"] == "t1"
    assert entry["reason"] == "beats baseline" and entry["deployed_at"].endswith("Z")
    assert json.loads((store.root / "deployments.json").read_text()) == [entry]


def test_promoting_an_unknown_or_incomplete_version_raises(store: ModelStore) -> None:
    with pytest.raises(ModelStoreError, match="no complete model version"):
        store.promote("20260101T000000.000000Z-deadbeef", 0.9, "t1", "r")
    half = store.versions_root / "20260101T000000.000000Z-cafef00d"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")

    with pytest.raises(ModelStoreError, match="no complete model version"):
        store.promote(half.name, 0.9, "t1", "r")
    assert half.name not in store.versions()
    assert store.deployment_history() == []


def test_rollback_walks_back_through_promotions(store: ModelStore) -> None:
    a, b, c = save(store, 0), save(store, 1), save(store, 2)
    store.promote(a, 0.90, "t1", "first")
    store.promote(b, 0.93, "t1", "better")
    store.promote(c, 0.95, "t2", "better still")

    to_b = store.rollback()
    to_a = store.rollback()

    assert (to_b["version"], to_b["action"], to_b["auc"]) == (b, "rollback", 0.93)
    assert to_a["version"] == a and store.deployed()["version"] == a
    assert c in to_b["reason"] and b in to_b["reason"]
    with pytest.raises(ModelStoreError, match="no earlier deployment"):
        store.rollback()
    assert [e["version"] for e in store.deployment_history()] == [a, b, c, b, a]


def test_rollback_to_a_named_earlier_version(store: ModelStore) -> None:
    a, b, c = save(store, 0), save(store, 1), save(store, 2)
    for version in (a, b, c):
        store.promote(version, 0.9, "t1", "r")

    entry = store.rollback(a, reason="c and b misbehave")

    assert entry["version"] == a and entry["reason"] == "c and b misbehave"
    with pytest.raises(ModelStoreError, match="no earlier deployment"):
        store.rollback()  # b and c were rolled away from


def test_rollback_refusals(store: ModelStore) -> None:
    with pytest.raises(ModelStoreError, match="nothing is deployed"):
        store.rollback()
    a, never_deployed = save(store, 0), save(store, 1)
    store.promote(a, 0.9, "t1", "r")

    with pytest.raises(ModelStoreError, match="already the deployed"):
        store.rollback(a)
    with pytest.raises(ModelStoreError, match="never deployed"):
        store.rollback(never_deployed)
    with pytest.raises(ModelStoreError, match="not a stored version"):
        store.rollback("20260101T000000.000000Z-deadbeef")
    with pytest.raises(ModelStoreError, match="only one"):
        store.rollback()
    assert len(store.deployment_history()) == 1


def test_crash_between_save_and_promote_keeps_the_previous_deployment(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = save(store, 0)
    store.promote(old, 0.9, "t1", "first")
    new = save(store, 1)
    real_replace = os.replace

    def crash(source: str, target: str) -> None:
        if str(target).endswith("deployments.json"):
            raise OSError("power cut")
        real_replace(source, target)

    monkeypatch.setattr(store_module.os, "replace", crash)

    with pytest.raises(OSError, match="power cut"):
        store.promote(new, 0.99, "t1", "second")

    history = json.loads((store.root / "deployments.json").read_text())
    assert [e["version"] for e in history] == [old]
    assert store.deployed()["version"] == old
    assert new in store.versions()  # stored, merely not deployed
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]


class _Tripwire:
    """Unpickling this creates a file, so a test can tell whether anything was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_version_with_a_pickle_file_is_refused(store: ModelStore, tmp_path: Path) -> None:
    version = save(store, 0)
    marker = tmp_path / "unpickled.txt"
    (store.version_path(version) / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))

    with pytest.raises(ModelStoreError, match=r"pytorch_model\.bin.*only safetensors"):
        store.load_version(version)
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["", "../escape", ".tmp-x", "a/b"])
def test_malformed_version_ids_are_rejected(store: ModelStore, bad: str) -> None:
    with pytest.raises(ModelStoreError):
        store.load_version(bad)


def test_store_module_imports_without_torch_or_transformers() -> None:
    import subprocess
    import sys

    code = (
        "import sys, mri_assets.core.store, mri_assets.core.metrics, mri_assets.core.recipe;"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'sklearn') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""

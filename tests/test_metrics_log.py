"""metrics.jsonl / TensorBoard / W&B of a training stage, on a local and on an object-store workdir."""
import json
import os
import pathlib
import sys
import types

import pytest

from sftmix_jax import metrics_log


class ObjectStore:
    """An object store's rules over a local directory: whole objects are written; nothing is appended."""

    writes = []

    def __init__(self, *parts):
        self.p = pathlib.Path(*[str(x) for x in parts])

    def _local(self):
        return pathlib.Path(str(self.p).replace("fake:/", ObjectStore.root + "/", 1))

    def __truediv__(self, name):
        return ObjectStore(self.p / name)

    def exists(self):
        return self._local().exists()

    def read_text(self):
        return self._local().read_text()

    def write_text(self, text):
        ObjectStore.writes.append(self.p.name)
        self._local().write_text(text)

    def write_bytes(self, data):
        ObjectStore.writes.append(self.p.name)
        self._local().write_bytes(data)

    def mkdir(self, parents=False, exist_ok=False):
        self._local().mkdir(parents=parents, exist_ok=exist_ok)

    def open(self, *args, **kw):
        raise AssertionError("an object is never opened for appending or streaming")


def test_an_object_store_workdir_is_written_whole_at_each_sync(tmp_path, monkeypatch):
    ObjectStore.root, ObjectStore.writes = str(tmp_path / "store"), []
    monkeypatch.setattr(metrics_log.epath, "Path", ObjectStore)
    monkeypatch.setattr(metrics_log.tempfile, "gettempdir", lambda: str(tmp_path / "local"))
    stage = "fake://bucket/run/reference"
    (tmp_path / "store" / "bucket" / "run" / "reference").mkdir(parents=True)
    log = metrics_log.MetricsLog(stage, 0)
    assert log.remote and not log.local.startswith(str(tmp_path / "store"))
    for step in range(1, 11):
        log.write(step, {"loss": 1.0 / step})
    assert ObjectStore.writes == []  # ten rows, no object written yet
    log.sync()  # a checkpoint
    rows = [json.loads(r) for r in (tmp_path / "store/bucket/run/reference/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert ObjectStore.writes.count("metrics.jsonl") == 1 and any(w.startswith("events.") for w in ObjectStore.writes)
    log.write(11, {"loss": 0.05})  # then the run dies before the next checkpoint

    resumed = metrics_log.MetricsLog(stage, 8)  # restored at step 8 (on this or another host)
    resumed.write(9, {"loss": 0.2})
    resumed.close()
    rows = [json.loads(r) for r in (tmp_path / "store/bucket/run/reference/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8, 9] and rows[-1]["loss"] == 0.2


def test_a_local_workdir_is_its_own_mirror(tmp_path):
    log = metrics_log.MetricsLog(str(tmp_path / "sftmix"), 0)
    log.write(1, {"loss": 2.0})  # appended at once: nothing to sync
    assert json.loads((tmp_path / "sftmix" / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.0}
    log.close()
    assert os.path.isdir(tmp_path / "sftmix" / "tb")


def test_metrics_go_to_wandb_when_a_project_is_named(tmp_path, monkeypatch):
    """W&B is optional: a stand-in module records what MetricsLog sends; '' never imports it."""
    calls = []
    run = types.SimpleNamespace(log=lambda m, step: calls.append(("log", step, m)), finish=lambda: calls.append(("finish",)))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = metrics_log.MetricsLog(str(tmp_path / "reference"), 0, wandb_project="proj", run_config={"seed": 0})
    log.write(10, {"loss": 1.5})
    log.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "proj" and calls[0][1]["config"] == {"seed": 0}
    assert calls[1:] == [("log", 10, {"loss": 1.5}), ("finish",)]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: a clear error naming the key
    with pytest.raises(ImportError, match="wandb_project='proj'.*pip install wandb"):
        metrics_log.MetricsLog(str(tmp_path / "sftmix"), 0, wandb_project="proj")
    calls.clear()  # an object-store workdir: W&B keeps its files in a local directory
    monkeypatch.setitem(sys.modules, "wandb", fake)
    ObjectStore.root, ObjectStore.writes = str(tmp_path / "store"), []
    monkeypatch.setattr(metrics_log.epath, "Path", ObjectStore)
    metrics_log.MetricsLog("fake://bucket/run/sftmix", 0, wandb_project="proj").close()
    assert "://" not in calls[0][1]["dir"] and calls[0][1]["name"] == "run/sftmix"

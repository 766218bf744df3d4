"""Checkpoints under attack and bad luck: planted code, damaged bytes, truncation, a full disk,
folders left behind; and the settings a run's numbers depend on, recorded with it."""
from __future__ import annotations

import errno
import io
import os
import re
import shutil
import struct
import subprocess
import zipfile

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from ablate import checkpoint
from ablate.ledger import Ledger, storage_url
from ablate.context import CHECKPOINT_STOP_EXIT
from ablate.runner import run_grid
from ablate.spec import load_spec
from ablate.train import train_cell
from conftest import run_ablate, tmpfs, write_spec
from test_train import CPU, Interrupt, _cfg


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """An uninterrupted 2-epoch cell's metrics, and the checkpoint folder of the same cell after epoch 1."""
    root = tmp_path_factory.mktemp("two-epochs")
    cfg = _cfg(epochs=2)
    whole = train_cell(cfg, device=CPU, checkpoint_dir=root / "whole", log=_quiet)

    def stop_in_second(stats):  # reported before its checkpoint: epoch 1's checkpoint stays
        if stats.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_cell(cfg, device=CPU, checkpoint_dir=root / "cut", on_epoch=stop_in_second, log=_quiet)
    return cfg, whole, root / "cut"


def _resume(two_epochs, tmp_path, damage):
    """Copy the epoch-1 checkpoint, ``damage(last.pt)``, resume: (metrics, log lines, folder)."""
    cfg, _, cut = two_epochs
    folder = tmp_path / "cell"
    shutil.copytree(cut, folder)
    damage(folder / "last.pt")
    lines = []
    return train_cell(cfg, device=CPU, checkpoint_dir=folder, log=lines.append), lines, folder


def _warning(lines, why):
    [line] = [m for m in lines if m.startswith("warning: checkpoint")]
    assert "last.pt" in line and why in line and "starts from scratch" in line, line
    return line


def _plant_code(path, marker):
    """A torch.save file whose unpickling would run a shell command, listed in a matching record:
    passing the integrity check (anyone who can write last.pt can write its record) it meets weights_only."""
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Evil()}, path)
    checkpoint.record_path(path).write_text(checkpoint._sha256(path) + "\n")


def test_checkpoint_holds_plain_data_and_its_record(two_epochs):
    _, _, cut = two_epochs
    path = cut / "last.pt"
    assert checkpoint.record_path(path).read_text().split()[0] == checkpoint._sha256(path)
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and "rng" not in state
    assert sorted(p.name for p in cut.iterdir()) == ["last.pt", "last.pt.sha256"]  # no temporary file left


def test_garbled_checkpoint_is_set_aside_and_the_result_is_the_uninterrupted_one(two_epochs, tmp_path):
    def garble(path):  # inside the largest tensor's bytes, where torch's own reader does not look
        with zipfile.ZipFile(path) as z:
            entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        data = bytearray(path.read_bytes())
        name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
        mid = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
        n = min(2600, entry.file_size // 3)
        data[mid - n // 2:mid - n // 2 + n] = os.urandom(n)
        path.write_bytes(bytes(data))

    resumed, lines, folder = _resume(two_epochs, tmp_path, garble)
    _warning(lines, "does not match its integrity record")
    assert not any("resuming" in m for m in lines)
    assert sum(m.startswith("epoch") for m in lines) == 2  # trained from scratch
    assert resumed["val_top1"] == two_epochs[1]["val_top1"]
    assert len(list(folder.glob("last.pt.bad-*"))) == 1 and len(list(folder.glob("last.pt.sha256.bad-*"))) == 1


def test_truncated_checkpoint_listed_in_its_record_does_not_fail_the_cell(two_epochs, tmp_path):
    def truncate(path):  # a record that matches the truncated bytes: torch.load itself must fail
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        checkpoint.record_path(path).write_text(checkpoint._sha256(path) + "\n")

    resumed, lines, _ = _resume(two_epochs, tmp_path, truncate)
    _warning(lines, "cannot be loaded as plain tensors and data")
    assert resumed["val_top1"] == two_epochs[1]["val_top1"]


def test_checkpoint_of_another_shape_is_set_aside(two_epochs, tmp_path):
    def foreign(path):  # intact and inert, written by this code, but not this cell's model
        checkpoint.save({"model": {"w": torch.zeros(3)}, "optimizer": {}, "scheduler": {}, "scaler": {},
                         "epoch": 1, "history": [], "elapsed": 0.0, "train_images": 0, "train_time": 0.0}, path)

    resumed, lines, _ = _resume(two_epochs, tmp_path, foreign)
    _warning(lines, "does not fit this cell")
    assert resumed["val_top1"] == two_epochs[1]["val_top1"]


def test_planted_code_and_records_missing_or_stale_never_load(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "c" / "last.pt"
    _plant_code(path, marker)
    lines = []
    assert checkpoint.load(path, "cpu", log=lines.append) is None
    assert not marker.exists() and not path.exists()
    _warning(lines, "cannot be loaded as plain tensors and data (UnpicklingError")
    # a checkpoint of an earlier version (random states, no record): set aside, not loaded
    torch.save({"epoch": 1, "rng": {"torch": torch.get_rng_state()}}, path)
    lines = []
    assert checkpoint.load(path, "cpu", log=lines.append) is None
    _warning(lines, "has no integrity record")
    # a kill between writing the record and renaming the new checkpoint into place: the previous one loads
    checkpoint.save({"epoch": 1}, path)
    checkpoint.save({"epoch": 2}, path.with_name("other.pt"))
    shutil.copy(checkpoint.record_path(path.with_name("other.pt")), tmp_path / "new-digest")
    checkpoint.record_path(path).write_text((tmp_path / "new-digest").read_text()
                                            + checkpoint.record_path(path).read_text())
    assert checkpoint.load(path, "cpu", log=lines.append)["epoch"] == 1


def test_planted_code_at_the_predictable_path_does_not_run_and_the_cell_finishes(workdir, capsys):
    spec_path = write_spec(workdir / "p.yaml", name="planted", epochs=1)
    spec = load_spec(spec_path)
    [cell] = spec.cells()
    marker = workdir / "pwned"
    _plant_code(workdir / "checkpoints" / spec.slug / cell.key / "last.pt", marker)
    assert run_grid(str(spec_path), progress=False).ok
    out = capsys.readouterr().out
    assert not marker.exists()
    assert "warning: checkpoint" in out and "UnpicklingError" in out and "last.pt" in out
    assert not (workdir / "checkpoints" / spec.slug).exists()  # finished: the cell's folder and its spec's gone
    # the run says what its numbers depend on besides the key and the device
    [run] = mlflow.search_runs([MlflowClient().get_experiment_by_name("planted").experiment_id],
                               filter_string="tags.`ablate.role` = 'cell'", output_format="list")
    tags = run.data.tags
    assert tags["ablate.threads"] == str(torch.get_num_threads())
    assert tags["ablate.deterministic_algorithms"] == str(torch.are_deterministic_algorithms_enabled())
    assert tags["ablate.cudnn_deterministic"] == str(torch.backends.cudnn.deterministic)
    assert tags["ablate.cudnn_benchmark"] == str(torch.backends.cudnn.benchmark)


def test_thread_count_is_what_trained_the_cell(tmp_path):
    before = torch.get_num_threads()
    tags = {}
    try:
        torch.set_num_threads(1)
        train_cell(_cfg(epochs=1), device=CPU, checkpoint_dir=tmp_path, on_start=tags.update, log=_quiet)
    finally:
        torch.set_num_threads(before)
    assert tags["ablate.threads"] == 1 and tags["ablate.deterministic_algorithms"] is False


class _FullDisk:
    """A file on a disk that fills up once the files written together hold ``disk["room"]`` bytes."""

    def __init__(self, path, disk):
        self.file, self.disk = open(path, "wb"), disk

    def write(self, data):
        if len(data) > self.disk["room"]:
            code = self.disk.get("errno", errno.ENOSPC)
            raise OSError(code, os.strerror(code))
        self.disk["room"] -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _fill_disk(monkeypatch, room=1000, code=errno.ENOSPC):
    disk = {"room": room, "errno": code}
    monkeypatch.setattr(checkpoint, "open", lambda path, mode="r": _FullDisk(path, disk) if "w" in mode
                        else open(path, mode), raising=False)


def test_full_disk_says_so_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1, "w": torch.zeros(10)}, path)
    _fill_disk(monkeypatch)
    with pytest.raises(checkpoint.CheckpointWriteFailed, match=f"^no space left on device writing {path} "):
        checkpoint.save({"epoch": 2, "w": torch.zeros(10_000)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]  # temporary file removed
    monkeypatch.undo()
    assert checkpoint.load(path, "cpu")["epoch"] == 1
    # room for the checkpoint but not its record: same message, same clean-up
    state = {"epoch": 2, "w": torch.zeros(10_000)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _fill_disk(monkeypatch, room=len(buffer.getvalue()) + 10)
    with pytest.raises(checkpoint.CheckpointWriteFailed, match="no space left on device writing .*last.pt.sha256"):
        checkpoint.save(state, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]
    # another write failure says what it was
    _fill_disk(monkeypatch, room=0, code=errno.EROFS)
    with pytest.raises(checkpoint.CheckpointWriteFailed, match=f"^cannot write {path}: Read-only file system "):
        checkpoint.save(state, path)


def test_full_disk_in_a_spawned_worker_ends_it_in_one_line(workdir, monkeypatch):
    import multiprocessing
    spec_path = write_spec(workdir / "w.yaml", name="full-disk-worker", epochs=1)
    _fill_disk(monkeypatch, room=100)
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())  # as in a spawned worker
    with pytest.raises(SystemExit) as stop:  # the process ends, no traceback: its parent stops the others
        run_grid(str(spec_path), progress=False)
    assert stop.value.code == CHECKPOINT_STOP_EXIT
    assert Ledger(storage_url(), "full-disk-worker").counts()["WAITING"] == 1


def test_full_disk_stops_the_grid_in_one_line_and_the_cells_resume(workdir, monkeypatch):
    from ablate.cli import cli
    spec_path = write_spec(workdir / "f.yaml", name="full-disk", epochs=1, extra="grid:\n  model.shift: [none, four]\n")
    _fill_disk(monkeypatch, room=100)
    result = CliRunner().invoke(cli, ["run", str(spec_path)])
    assert result.exit_code == 2, result.output
    assert result.output.count("training on") == 1  # the grid stopped: the second cell never started
    assert "Traceback" not in result.output and "FAILED" not in result.output
    [error] = [m for m in result.output.splitlines() if m.startswith("error:")]
    assert re.match(r"error: no space left on device writing \S+/last\.pt \(", error), error
    assert not list((workdir / "checkpoints").rglob("*.tmp"))
    keys = {c.key for c in load_spec(spec_path).cells()}
    ledger = Ledger(storage_url(), "full-disk")
    assert not any(t.user_attrs.get("ablate.failure") for t in ledger.trials())
    assert ledger.counts(keys)["WAITING"] == 2  # both cells still queued: the stopped one handed back
    exp = MlflowClient().get_experiment_by_name("full-disk")
    [cell_run] = mlflow.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'",
                                    output_format="list")
    assert cell_run.info.status == "RUNNING"  # continued by the next run, not a failure
    monkeypatch.undo()
    summary = run_grid(str(spec_path), progress=False)
    assert summary.ok and summary.progress.counts["finished"] == 2
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'", output_format="list")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


def test_cell_finished_in_mlflow_removes_its_checkpoint_folder(workdir, monkeypatch, capsys):
    monkeypatch.delenv("ABLATE_CHECKPOINTS")  # the default root, checkpoints/ in the working directory
    spec_path = write_spec(workdir / "d.yaml", name="done-before", epochs=1)
    assert run_grid(str(spec_path), progress=False).ok
    assert not (workdir / "checkpoints").exists()  # nothing left behind, not even empty folders
    # a worker that closed the MLflow run and died before telling the ledger or removing its folder
    spec = load_spec(spec_path)
    [cell] = spec.cells()
    folder = workdir / "checkpoints" / spec.slug / cell.key
    checkpoint.save({"epoch": 1}, folder / "last.pt")
    monkeypatch.setenv("ABLATE_STORAGE", f"sqlite:///{workdir / 'other-ledger.db'}")
    capsys.readouterr()
    assert run_grid(str(spec_path), progress=False).ok
    assert "already finished in MLflow" in capsys.readouterr().out
    assert not (workdir / "checkpoints").exists()


def test_removing_a_cell_folder_keeps_what_others_use(tmp_path):
    root = tmp_path / "ckpts"
    for key in ("a", "b"):
        checkpoint.save({"epoch": 1}, root / "spec" / key / "last.pt")
    checkpoint.remove(root / "spec" / "a", root, remove_root=True)
    assert sorted(p.name for p in (root / "spec").iterdir()) == ["b"]
    checkpoint.remove(root / "spec" / "b", root, remove_root=False)  # a root the user named stays
    assert root.exists() and not (root / "spec").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 KiB file system (tmpfs), too small for a checkpoint; skipped where mounting is not allowed."""
    with tmpfs(tmp_path / "disk", "16k") as disk:
        yield disk


def test_a_real_full_disk_stops_in_one_line_and_the_cell_finishes_once_there_is_room(workdir, small_disk):
    import subprocess

    from ablate.cli import cli
    spec_path = write_spec(workdir / "r.yaml", name="real-full-disk", epochs=1)
    result = CliRunner().invoke(cli, ["run", str(spec_path), "--checkpoints", str(small_disk)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    [error] = [m for m in result.output.splitlines() if m.startswith("error:")]
    assert re.match(rf"error: no space left on device writing {small_disk}/\S+/last\.pt \(free some space", error)
    assert not list(small_disk.rglob("*.tmp"))  # the partial file is gone
    assert Ledger(storage_url(), "real-full-disk").counts()["WAITING"] == 1
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # room made
    result = CliRunner().invoke(cli, ["run", str(spec_path), "--checkpoints", str(small_disk)])
    assert result.exit_code == 0, result.output
    assert Ledger(storage_url(), "real-full-disk").counts()["COMPLETE"] == 1


def test_a_real_full_disk_under_two_workers_stops_both_in_one_error(workdir, small_disk):
    from ablate.cli import cli
    spec_path = write_spec(workdir / "r2.yaml", name="real-full-disk-2", epochs=1,
                           extra="grid:\n  model.shift: [none, four]\n")
    # a command line of its own: the workers' lines go to the process's stdout, past CliRunner
    result = run_ablate("run", str(spec_path), "--workers", "2", "--checkpoints", str(small_disk), cwd=workdir)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and "exited abnormally" not in output
    stopped = re.findall(r"\[w\d\] cell \w+: stopped: no space left on device writing \S+/last\.pt", output)
    assert 1 <= len(stopped) <= 2, output  # the other worker may be stopped before its first save
    [error] = [m for m in output.splitlines() if m.startswith("error:")]
    assert re.match(r"error: ablate-worker-\d(, ablate-worker-\d)? could not write a checkpoint .* every worker was stopped", error)
    ledger = Ledger(storage_url(), "real-full-disk-2")
    assert not ledger.counts().get("COMPLETE") and not any(t.user_attrs.get("ablate.failure") for t in ledger.trials())
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    result = CliRunner().invoke(cli, ["run", str(spec_path), "--checkpoints", str(small_disk)])  # one worker will do
    assert result.exit_code == 0, result.output
    assert Ledger(storage_url(), "real-full-disk-2").counts()["COMPLETE"] == 2

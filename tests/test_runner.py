"""`ablate run` end to end on the embedded digits: real training, real MLflow and Optuna stores."""
from __future__ import annotations

import signal
import subprocess

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ablate.ledger import Ledger, storage_url
from ablate.runner import run_grid
from ablate.spec import load_spec
from conftest import ablate_cmd, run_ablate, wait_for, write_spec


def _cell_runs(name: str):
    exp = MlflowClient().get_experiment_by_name(name)
    return mlflow.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'",
                              output_format="list")


def _finished_by_key(name: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for run in _cell_runs(name):
        if run.info.status == "FINISHED":
            key = run.data.tags["ablate.cell_key"]
            out[key] = out.get(key, 0) + 1
    return out


def test_grid_end_to_end_and_rerun_trains_nothing(workdir, capsys):
    spec = write_spec(workdir / "g.yaml", name="grid-e2e", extra="grid:\n  model.shift: [none, four]\n")
    summary = run_grid(str(spec), progress=False)
    assert summary.ok and summary.progress.counts["finished"] == 2
    runs = _cell_runs("grid-e2e")
    assert len(runs) == 2
    keys = {c.key for c in load_spec(spec).cells()}
    for run in runs:
        assert run.info.status == "FINISHED"
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["ablate.cell_key"] in keys and tags["ablate.state"] == "COMPLETE"
        assert tags["ablate.varied"] == '["model.shift"]' and tags["ablate.git_commit"]
        assert tags["ablate.data_loader"] == "memory" and tags["ablate.device"] == "cpu"
        assert params["model.shift"] in ("none", "four") and params["train.seed"] == "0"
        for m in ("val_top1", "val_top5", "params", "params_paper", "macs", "flops", "train_seconds",
                  "images_per_second", "skipped_images"):
            assert m in metrics, m
        assert metrics["flops"] == 2 * metrics["macs"] and 0 <= metrics["val_top1"] <= 100
        history = MlflowClient().get_metric_history(run.info.run_id, "val_top1")
        assert [h.step for h in history] == [1, 2]
    # the checkpoint of a finished cell is gone: the MLflow run is the record
    assert not any((workdir / "checkpoints" / "grid-e2e").glob("*/last.pt"))
    capsys.readouterr()
    again = run_grid(str(spec), progress=False)
    out = capsys.readouterr().out
    assert again.ok and "2 already finished, 0 queued" in out and "training on" not in out
    assert len(_cell_runs("grid-e2e")) == 2


@pytest.mark.slow
def test_failing_cell_does_not_stop_the_grid(workdir):
    spec = write_spec(workdir / "nan.yaml", name="nan-grid", extra="grid:\n  train.lr: [1.0e+30, 3.0e-3]\n")
    result = run_ablate("run", str(spec), cwd=workdir)
    assert result.returncode == 1, result.stderr
    assert "1/2 cells finished, 1 failed" in result.stdout
    assert "non-finite loss" in result.stdout
    runs = _cell_runs("nan-grid")
    states = sorted((r.data.params["train.lr"], r.info.status) for r in runs)
    assert states == [("0.003", "FINISHED"), ("1e+30", "FAILED")]
    failed = [r for r in runs if r.info.status == "FAILED"][0]
    assert "non-finite loss" in failed.data.tags["ablate.failure"]


def test_bad_spec_writes_nothing(workdir):
    (workdir / "bad.yaml").write_text("name: x\nmodel: {width: 30, shift: four}\n")
    result = run_ablate("run", "bad.yaml", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.width" in result.stderr or "width" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["bad.yaml"]


def test_bad_device_writes_nothing(workdir):
    write_spec(workdir / "s.yaml")
    result = run_ablate("run", "s.yaml", "--device", "cuda:0", cwd=workdir)
    assert result.returncode == 2 and "CUDA is not available" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["s.yaml"]


@pytest.mark.slow
def test_kill_9_mid_cell_then_resume(workdir):
    spec = write_spec(workdir / "k.yaml", name="killed", epochs=4,
                      extra="grid:\n  model.shift: [none, four, eight]\n")
    ckpts = workdir / "checkpoints" / "killed"
    proc = subprocess.Popen(ablate_cmd("run", str(spec)), cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert wait_for(lambda: any(ckpts.glob("*/last.pt"))), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = [p.parent.name for p in ckpts.glob("*/last.pt")]
    assert len(interrupted) == 1

    result = run_ablate("run", str(spec), cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"cell {interrupted[0]}" in result.stdout and "resuming from" in result.stdout
    finished = _finished_by_key("killed")
    assert finished == {c.key: 1 for c in load_spec(spec).cells()}
    # the interrupted MLflow run was continued, not duplicated: one run per cell in all
    assert len(_cell_runs("killed")) == 3
    run = [r for r in _cell_runs("killed") if r.data.tags["ablate.cell_key"] == interrupted[0]][0]
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_concurrent_runners_train_each_cell_once(workdir):
    spec = write_spec(workdir / "c.yaml", name="concurrent",
                      extra="grid:\n  model.shift: [none, four, eight, up]\n")
    # create the stores once, as the docs say to, then start both runners at the same moment
    Ledger(storage_url(), "concurrent")
    procs = [subprocess.Popen(ablate_cmd("run", str(spec), *extra), cwd=workdir, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for extra in ([], ["--workers", "2"])]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trained = sum(out.count("training on") for out in outputs)
    assert trained == 4, outputs
    assert _finished_by_key("concurrent") == {c.key: 1 for c in load_spec(spec).cells()}
    ledger = Ledger(storage_url(), "concurrent")
    assert ledger.counts({c.key for c in load_spec(spec).cells()})["COMPLETE"] == 4
    assert len([t for t in ledger.trials() if t.state == TrialState.COMPLETE]) == 4


def test_imagefolder_grid_skips_a_corrupt_jpeg_and_records_it(workdir):
    from test_data import write_jpeg
    root = workdir / "images"
    for c, name in enumerate(("ant", "bee")):
        for i in range(6):
            write_jpeg(root / "train" / name / f"{i}.jpg", 10 * c + i)
        for i in range(2):
            write_jpeg(root / "val" / name / f"v{i}.jpg", 100 + 10 * c + i)
    good = (root / "train" / "ant" / "0.jpg").read_bytes()
    (root / "train" / "ant" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    spec = workdir / "folder.yaml"
    spec.write_text(f"""\
name: folder-grid
data: {{name: imagefolder, root: {root}, workers: 0}}
model: {{image_size: 16, patch_size: 4, width: 16, depth: 1, mlp_ratio: 2}}
train: {{epochs: 2, batch_size: 4, warmup_epochs: 0}}
""")
    summary = run_grid(str(spec), progress=False)
    assert summary.ok
    [run] = _cell_runs("folder-grid")
    assert run.info.status == "FINISHED" and run.data.tags["ablate.data_loader"] == "folder"
    assert run.data.metrics["skipped_images"] == 1


@pytest.mark.slow
def test_two_specs_sharing_a_name_run_at_once_each_train_their_own_cells(workdir):
    """One study, two grids: each runner takes its own cells and leaves the other's to it."""
    a = write_spec(workdir / "A.yaml", name="shared", epochs=1, extra="grid:\n  model.shift: [none, eight]\n")
    b = write_spec(workdir / "B.yaml", name="shared", epochs=1, extra="grid:\n  train.lr: [1.0e-3, 4.0e-3]\n")
    procs = [subprocess.Popen(ablate_cmd("run", str(spec)), cwd=workdir, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for spec in (a, b)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("2/2 cells finished, 0 failed" in out for out in outputs), outputs
    keys = [c.key for spec in (a, b) for c in load_spec(spec).cells()]
    assert len(set(keys)) == 4
    assert _finished_by_key("shared") == {k: 1 for k in keys}
    ledger = Ledger(storage_url(), "shared")
    assert sorted(t.user_attrs["ablate.cell_key"] for t in ledger.trials(states=(TrialState.COMPLETE,))) == sorted(keys)
    assert not ledger.trials(states=(TrialState.FAIL,))

"""A cell finished under one spec is not trained again under another: the paper's six
ImageNet100 tables share their baseline row, a multi-GPU-day cell."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from ablate import names
from conftest import run_ablate, write_spec


def _cell_runs(cwd, experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`{names.ROLE}` = 'cell'")


@pytest.mark.slow
def test_a_cell_another_spec_finished_is_recorded_not_trained(workdir):
    write_spec(workdir / "a.yaml", name="reuse-a", epochs=1, extra="grid:\n  model.shift: [none, four]\n")
    write_spec(workdir / "b.yaml", name="reuse-b", epochs=1, extra="grid:\n  model.shift: [four, eight]\n")
    first = run_ablate("run", "a.yaml", cwd=workdir)
    assert first.returncode == 0, first.stdout + first.stderr

    second = run_ablate("run", "b.yaml", cwd=workdir)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 queued (1 of them reused from other specs, not trained: --no-reuse trains them)" in second.stdout
    assert second.stdout.count("training on") == 1 and "(shift=eight): training on" in second.stdout
    assert "reused, finished under another spec" in second.stdout

    [original] = [r for r in _cell_runs(workdir, "reuse-a") if r.data.params["model.shift"] == "four"]
    runs = {r.data.params["model.shift"]: r for r in _cell_runs(workdir, "reuse-b")}
    copy = runs["four"]
    assert copy.info.status == "FINISHED" and copy.data.tags[names.STATE] == "COMPLETE"
    assert copy.data.tags[names.REUSED_FROM] == original.info.run_id
    assert copy.data.tags[names.REUSED_EXPERIMENT] == original.info.experiment_id
    assert copy.data.tags[names.CELL_KEY] == original.data.tags[names.CELL_KEY]
    assert copy.data.metrics["val_top1"] == original.data.metrics["val_top1"]
    assert copy.data.tags[names.DEVICE] == original.data.tags[names.DEVICE]
    assert names.REUSED_FROM not in runs["eight"].data.tags

    # status and the report count it as finished; the report reads its learning curve at the source
    status = run_ablate("status", "b.yaml", cwd=workdir)
    assert "grid of 2 cells: 2 finished" in status.stdout, status.stdout
    report = run_ablate("report", "b.yaml", cwd=workdir)
    assert report.returncode == 0 and "2 runs in 2 configurations" in report.stdout, report.stdout + report.stderr

    # --no-reuse trains it anyway
    write_spec(workdir / "c.yaml", name="reuse-c", epochs=1, extra="grid:\n  model.shift: [none]\n")
    third = run_ablate("run", "c.yaml", "--no-reuse", cwd=workdir)
    assert third.returncode == 0 and "reused" not in third.stdout and third.stdout.count("training on") == 1
    [trained] = _cell_runs(workdir, "reuse-c")
    assert names.REUSED_FROM not in trained.data.tags

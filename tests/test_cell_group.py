"""`ablate run --gpus-per-cell N`: one cell trained by N processes (gloo on CPU), end to end."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ablate.ledger import Ledger, storage_url
from ablate.spec import load_spec
from conftest import ablate_cmd, run_ablate, wait_for, write_spec
from test_hostile_input import refused

pytestmark = pytest.mark.slow


def _cell_runs(name: str):
    exp = MlflowClient().get_experiment_by_name(name)
    return mlflow.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'",
                              output_format="list")


def _start(spec, *args, cwd):
    proc = subprocess.Popen(ablate_cmd("run", str(spec), "--device", "cpu", *args), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _assert_each_cell_once(spec, name: str, epochs: int) -> None:
    runs = _cell_runs(name)
    assert sorted(r.data.tags["ablate.cell_key"] for r in runs) == sorted(c.key for c in load_spec(spec).cells())
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_top1")]
        assert sorted(set(steps)) == list(range(1, epochs + 1))


def test_two_processes_per_cell_then_kill_9_and_resume_as_one(workdir):
    spec = write_spec(workdir / "g.yaml", name="grouped", epochs=4, extra="grid:\n  model.shift: [none, four]\n")
    ckpts = workdir / "checkpoints" / "grouped"
    proc, lines = _start(spec, "--gpus-per-cell", "2", cwd=workdir)
    assert wait_for(lambda: any(ckpts.glob("*/last.pt"))), "".join(lines)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = "".join(lines)
    assert "batch: 64 per step = 2 process(es) x 1 pass(es) x 32 images" in out, out
    assert "rank 1 of 2 on cpu" in out
    # the workers die with their parent: nothing is left training
    assert wait_for(lambda: not subprocess.run(["pgrep", "-f", f"ablate-worker.*{workdir}"],
                                               capture_output=True).stdout, timeout=30)

    # resumed by one process, whose single pass of 64 is another split of the same training
    result = run_ablate("run", str(spec), "--device", "cpu", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout
    _assert_each_cell_once(spec, "grouped", 4)
    tags = [r.data.tags for r in _cell_runs("grouped")]
    assert {t["ablate.processes"] for t in tags} == {"1"}  # the last attempt's split


def test_a_rank_that_dies_ends_the_attempt_not_the_cell(workdir):
    spec = write_spec(workdir / "d.yaml", name="rankdies", epochs=4)
    ckpts = workdir / "checkpoints" / "rankdies"
    proc, lines = _start(spec, "--gpus-per-cell", "2", cwd=workdir)
    assert wait_for(lambda: any(ckpts.glob("*/last.pt")) and "pid" in "".join(lines)), "".join(lines)
    follower = int(re.search(r"rank 1 of 2 on cpu \(pid (\d+)\)", "".join(lines)).group(1))
    os.kill(follower, signal.SIGKILL)
    assert proc.wait(timeout=120) == 1
    out = "".join(lines)
    assert "stopped:" in out and "resumes from its last checkpoint" in out, out
    assert "FAILED" not in out and "Traceback" not in out, out
    # the cell is queued again to resume, with no failure recorded anywhere
    ledger = Ledger(storage_url(None), "rankdies", create=False)
    (key,) = [c.key for c in load_spec(spec).cells()]
    assert [t.user_attrs["ablate.cell_key"] for t in ledger.trials(states=(TrialState.WAITING,))] == [key]
    assert not [t for t in ledger.trials() if "ablate.failure" in t.user_attrs]
    assert [r.info.status for r in _cell_runs("rankdies")] == ["RUNNING"]
    result = run_ablate("run", str(spec), "--device", "cpu", "--gpus-per-cell", "2", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout
    _assert_each_cell_once(spec, "rankdies", 4)


def test_batches_that_do_not_divide_are_refused_before_anything_runs(workdir, monkeypatch):
    """Refusals only, in process: nothing is written, nothing trains."""
    spec = str(write_spec(workdir / "b.yaml", name="nodivide"))
    assert refused("run", spec, "--device", "cpu", "--gpus-per-cell", "2", "--set", "train.batch_size=63").endswith(
        "train.batch_size: 63 does not divide over --gpus-per-cell 2 processes (allowed: a multiple of 2)")
    assert "micro_batch 24 does not divide batch_size 64" in refused(
        "run", spec, "--device", "cpu", "--gpus-per-cell", "2", "--set", "train.micro_batch=24")
    # a batch larger than the training split would train nothing and record chance as a result
    assert refused("run", spec, "--device", "cpu", "--set", "train.batch_size=2048").endswith(
        "train.batch_size: 2048 is larger than the 1437 training images of digits: an epoch would train nothing "
        "(allowed: at most 1437)")
    for variable, value in (("ABLATE_DIST_TIMEOUT", "soon"), ("ABLATE_PEAK_TFLOPS", "-3")):
        with monkeypatch.context() as m:
            m.setenv(variable, value)
            assert refused("run", spec, "--device", "cpu", "--gpus-per-cell", "2").startswith(
                f"{variable}: '{value}' (allowed: ")
    assert "--gpus-per-cell: 64 training processes, more than" in refused(
        "run", spec, "--device", "cpu", "--gpus-per-cell", "64")
    assert not (workdir / "mlflow.db").exists() or not MlflowClient().get_experiment_by_name("nodivide")

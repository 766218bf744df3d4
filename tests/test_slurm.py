"""`--launcher slurm`, `ablate status` and `ablate cancel` against a real Slurm cluster.

The cluster is the single-node one that `.ci/slurm.sh up` starts on this machine (munged,
slurmdbd on MariaDB, slurmctld, slurmd with two fake GPUs and a second partition, `multi`,
that also lists a node that never comes up). `.ci/run` starts it for CI; elsewhere these tests
skip and say how to start it, except under CI=true, where a missing cluster is a failure.
Settings checks that Slurm need not see run without it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ablate.spec import load_spec
from conftest import ROOT, ablate_cmd, run_ablate, write_spec

CONF = os.environ.get("SLURM_CONF") or os.path.join(os.environ.get("ABLATE_SLURM_DIR", "/tmp/ablate-slurm"),
                                                    "etc", "slurm.conf")
HEARTBEAT = "2"  # seconds between heartbeats (grace 4x): dead workers are noticed quickly


def _cluster_problem() -> str | None:
    if not os.path.exists(CONF):
        return f"no Slurm configuration at {CONF}"
    try:
        ping = subprocess.run(["scontrol", "ping"], env={**os.environ, "SLURM_CONF": CONF}, capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol: {e}"
    return None if ping.returncode == 0 and "UP" in ping.stdout else f"slurmctld does not answer: {ping.stdout}{ping.stderr}"


@pytest.fixture
def slurm(workdir, monkeypatch):
    """The local cluster, with this test's stores in the environment the tasks inherit."""
    problem = _cluster_problem()
    if problem:
        if os.environ.get("CI"):  # CI starts the cluster: a missing one is a failure, not a skip
            pytest.fail(f"no Slurm cluster: {problem}")
        pytest.skip(f"no local Slurm cluster ({problem}); start one with `.ci/slurm.sh up`")
    monkeypatch.setenv("SLURM_CONF", CONF)
    monkeypatch.setenv("ABLATE_HEARTBEAT", HEARTBEAT)
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return workdir


def _slurm(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True, timeout=60).stdout


def _jobs_named(name: str) -> list[str]:
    """Every job of this cluster's accounting (any state) and queue with this job name."""
    acct = _slurm("sacct", "-n", "-X", "-P", "-a", "-S", "now-1days", "--name", name, "-o", "JobID")
    queue = _slurm("squeue", "-h", "-n", name, "-o", "%i")
    return sorted(set(acct.split()) | set(queue.split()))


def _files(root: Path) -> dict:
    """Every file and folder under ``root``, with each file's time and content."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) if p.is_file() else None
            for p in root.rglob("*")}


def _epochs_logged(workdir: Path, slug: str, *, unfinished: bool = False) -> dict[str, tuple[int, str]]:
    """cell key -> (the last epoch a task's log shows for it, that task "JOB_TASK"): cheap to poll.
    ``unfinished``: only cells not done yet."""
    out: dict[str, tuple[int, str]] = {}
    for path in (workdir / "slurm-logs" / slug).glob("*_log.out"):
        task, key = path.name.rsplit("_", 2)[0], None
        for line in path.read_text().splitlines():
            if m := re.match(r"cell (\w+) \(", line):
                key = m[1]
            elif (m := re.match(r"\s+epoch (\d+)/", line)) and key:
                out[key] = (int(m[1]), task)
            elif (m := re.match(r"cell (\w+): done", line)) and unfinished:
                out.pop(m[1], None)
    return out


def _wait(predicate, what: str, timeout: float = 300.0, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _cell_runs(name: str):
    import mlflow
    from mlflow.tracking import MlflowClient
    exp = MlflowClient().get_experiment_by_name(name)
    return mlflow.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'cell'", output_format="list")


def _finished_by_key(name: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for run in _cell_runs(name):
        if run.info.status == "FINISHED":
            out[run.data.tags["ablate.cell_key"]] = out.get(run.data.tags["ablate.cell_key"], 0) + 1
    return out


def _steps(name: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient
    [run] = [r for r in _cell_runs(name) if r.data.tags["ablate.cell_key"] == key]
    return sorted({m.step for m in MlflowClient().get_metric_history(run.info.run_id, "train_loss")})


def _logs(workdir: Path, slug: str) -> str:
    return "\n".join(p.read_text() for p in sorted((workdir / "slurm-logs" / slug).glob("*_log.out")))


def _launch(spec: Path, kind: str = "grid", workers: int = 1, *settings: str):
    from ablate.launch.settings import load_settings
    from ablate.launch.slurm import launch
    return launch(str(spec), kind=kind, workers=workers, settings=load_settings(["time=10", *settings])).launch


def _status(spec: Path):
    from ablate.status import collect
    return collect(str(spec))


def _finished_and_ended(spec: Path):
    """The status once every cell is done and every task has ended, else None."""
    status = _status(spec)
    return status if status.done and not any(t.active for t in status.tasks) else None


def _folder_spec(workdir: Path, filename: str, name: str, epochs: int, extra: str = "") -> Path:
    """A spec on a small JPEG tree through the folder loader with two data-loading workers, which
    Slurm signals too (what the paper path runs, rather than digits in memory)."""
    from imagetree import make_tree
    root = workdir / "images"
    if not root.exists():
        make_tree(root, classes=4, per_class=40)
    path = workdir / filename
    path.write_text(f"""\
name: {name}
data: {{name: imagefolder, root: {root}, loader: folder, workers: 2}}
model: {{image_size: 16, patch_size: 4, width: 16, depth: 1, mlp_ratio: 2, shift: four}}
train: {{epochs: {epochs}, batch_size: 16, lr: 3.0e-3, warmup_epochs: 0, randaugment: null, mixup: 0, cutmix: 0}}
""" + extra)
    return path


def _row(status, key: str):
    return next(r for r in status.rows if r.key == key)


def _nothing_written(workdir: Path, *keep: str) -> None:
    assert sorted(p.name for p in workdir.iterdir()) == sorted(keep)


def _cli(*args: str, env: dict | None = None):
    """The command line, in this process (no interpreter start-up per call)."""
    from click.testing import CliRunner

    from ablate.cli import cli
    return CliRunner().invoke(cli, list(args), env=env)


@pytest.mark.slow
def test_grid_as_an_array_of_two_tasks_trains_every_cell_once(slurm):
    # --name: the commands it prints to follow and to stop the launch must name the same experiment
    spec = write_spec(slurm / "g.yaml", name="sl-array-spec", extra="grid:\n  model.shift: [none, four, eight]\n")
    (slurm / "lab.yaml").write_text("time: 0:10:00\ngpus_per_task: 1\nmem: 500M\nsetup: [echo setup line ran]\n")
    result = run_ablate("run", str(spec), "--launcher", "slurm", "--workers", "2", "--slurm-profile", "lab.yaml",
                        "--slurm", "cpus_per_task=1", "--name", "sl-array", "--follow", cwd=slurm, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    job = re.search(r"submitted Slurm job (\d+): 2 task\(s\), partition debug, time 00:10:00 per task, 1 GPU\(s\) "
                    r"per task, 1 CPUs per task, 500M per task", out)[1]
    assert f"logs: {slurm / 'slurm-logs' / 'sl-array'}" in out
    follow, stop = re.search(r"follow: (.+?)    stop: (.+)", out).groups()
    assert (follow, stop) == (f"ablate status {spec} --name sl-array", f"ablate cancel {spec} --name sl-array")
    assert "sl-array: grid of 3 cells: 3 finished, 0 running; elapsed" in out  # the final table
    assert out.rstrip().endswith(f"next: ablate report {spec} --name sl-array")
    keys = {c.key for c in load_spec(spec).cells()}
    assert _finished_by_key("sl-array") == {k: 1 for k in keys}
    logs = _logs(slurm, "sl-array")
    assert logs.count("training on") == 3 and "resuming" not in logs
    # one fake GPU each: Slurm gave the two tasks different devices; the profile's setup line ran
    assert sorted(re.findall(r"CUDA_VISIBLE_DEVICES=(\d), 1 CPUs", logs)) == ["0", "1"]
    assert logs.count("setup line ran") == 2
    from mlflow.tracking import MlflowClient
    [parent] = [r for r in MlflowClient().search_runs([_cell_runs("sl-array")[0].info.experiment_id],
                                                      "tags.`ablate.role` = 'parent'")]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ablate.launcher"] == "slurm" and parent.data.tags["ablate.slurm_job"] == job
    files = _files(slurm)
    status = json.loads(_cli(*shlex.split(follow)[1:], "--json").stdout)  # the command it printed
    assert _files(slurm) == files  # status wrote nothing: no file changed, none appeared (no lock file either)
    assert status["done"] and status["counts"]["finished"] == 3 and status["eta"] == 0
    assert all(r["top1"] is not None for r in status["rows"])
    assert sorted((t["job"], t["state"]) for t in status["tasks"]) == [(f"{job}_0", "COMPLETED"),
                                                                       (f"{job}_1", "COMPLETED")]


@pytest.mark.slow
def test_a_cancelled_task_s_cell_resumes_from_its_checkpoint_in_the_other(slurm):
    # six epochs: the cell is still mid-way when SIGKILL follows the SIGTERM (KillWait) on a fast machine
    spec = _folder_spec(slurm, "c.yaml", "sl-scancel", epochs=6, extra="grid:\n  model.shift: [none, four]\n")
    job = _launch(spec, "grid", 2).job
    # epoch 2 is logged once epoch 1's checkpoint is written: there is something to resume from
    logged = _wait(lambda: {k: v for k, v in _epochs_logged(slurm, "sl-scancel").items() if v[0] >= 2},
                   "a cell past its second epoch", every=0.2)
    key, (_, victim) = next(iter(logged.items()))
    _slurm("scancel", victim)
    other = f"{job}_{1 - int(victim.split('_')[1])}"
    seen = []

    def finished():
        row = _row(_status(spec), key)
        if not seen or seen[-1] != (row.state, row.slurm_task):
            seen.append((row.state, row.slurm_task))
        return row.state == "finished"
    _wait(finished, "the cancelled task's cell to finish", every=0.5)
    # ablate status saw the cancelled task's cell left behind, then finished by the other task
    # (on a fast machine the resumed epochs can pass between two polls, so "running" there may
    # go unseen; who finished it is on the finished row)
    assert seen[-1] == ("finished", other), seen
    after_cancel = seen[seen.index(("running", victim)) + 1:] if ("running", victim) in seen else seen
    assert any(s in ("interrupted", "waiting") or (s, t) == ("running", other) for s, t in after_cancel[:-1]), seen

    status = _wait(lambda: _finished_and_ended(spec), "the grid to finish and the tasks to end", every=2.0)
    assert {t.job: t.state for t in status.tasks} == {victim: "CANCELLED", other: "COMPLETED"}
    assert _finished_by_key("sl-scancel") == {c.key: 1 for c in load_spec(spec).cells()}
    assert _steps("sl-scancel", key) == [1, 2, 3, 4, 5, 6]
    logs = _logs(slurm, "sl-scancel")
    assert re.search(rf"cell {key} .*: resuming on cpu", logs), logs
    assert re.search(rf"resuming from .*{key}/last.pt after epoch [1-5]/6", logs), logs
    # the data-loading workers left the SIGTERM to the trainer: no "DataLoader worker killed"
    assert "2 workers" in logs and "Traceback" not in logs and "DataLoader worker" not in logs, logs


@pytest.mark.slow
def test_a_task_requeued_at_its_time_limit_resumes_its_cell_rather_than_restarting_it(slurm):
    spec = _folder_spec(slurm, "r.yaml", "sl-requeue", epochs=5)
    job = _launch(spec, "grid", 1).job
    [key] = [c.key for c in load_spec(spec).cells()]
    _wait(lambda: _epochs_logged(slurm, "sl-requeue").get(key, (0,))[0] >= 3, "three epochs", every=0.2)
    # what Slurm sends before a task's time limit (and what submitit's own tests send): the task
    # requeues itself (scontrol requeue) and its next run goes on
    _slurm("scancel", "--signal=USR2", job)
    _wait(lambda: _status(spec).done, "the cell to finish", every=2.0)
    logs = _logs(slurm, "sl-requeue")
    # submitit logs "Requeued job" only after `scontrol requeue` returns, and Slurm may end the
    # step first; its own line says the same
    assert "Caught signal SIGUSR2" in logs, logs
    # the trainer's handler alone checkpointed and requeued, not one per data-loading worker too
    assert logs.count("Calling checkpoint method.") == 1 and "2 workers" in logs and "Traceback" not in logs, logs
    assert f"Requeued job {job}" in logs or re.search(rf"JOB {job} ON \S+ CANCELLED AT \S+ DUE TO JOB REQUEUE", logs), logs
    assert logs.count(f"task {job} on ") == 2, logs  # the same task, started again
    assert "released trial(s) [0] of its previous run" in logs
    resumed = re.search(rf"resuming from .*{key}/last.pt after epoch (\d)/5", logs)
    assert resumed and int(resumed[1]) >= 2, logs
    # the epochs before the requeue were not trained again
    assert logs.count("epoch 1/5 ") == 1 and logs.count("training on") == 1
    assert _finished_by_key("sl-requeue") == {key: 1} and _steps("sl-requeue", key) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_search_on_slurm_reaches_its_trial_count(slurm):
    spec = write_spec(slurm / "s.yaml", name="sl-search", epochs=1, extra="""\
        search:
          sampler: random
          objectives: [val_top1]
          trials: 4
          space:
            model.shift: {choice: [none, four, eight]}
            train.lr: {float: [1.0e-3, 5.0e-3], log: true}
        """)
    job = _launch(spec, "search", 2).job
    status = _wait(lambda: (s := _status(spec)).done and s, "the search to finish", every=2.0)
    assert status.counts["finished"] == 4 and status.total == 4
    from ablate.ledger import storage_url
    from ablate.ledger import Ledger
    ledger = Ledger.for_spec(load_spec(spec), storage_url())
    assert ledger.search_counts() == (4, 0, 0)
    runs = [r for r in _cell_runs("sl-search") if r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["ablate.trial_number"]) for r in runs) == [0, 1, 2, 3]
    assert {t.job for t in status.tasks} == {f"{job}_0", f"{job}_1"}


@pytest.mark.slow
def test_follow_stops_on_ctrl_c_cancel_stops_the_jobs_and_a_relaunch_finishes_the_rest(slurm):
    # more cells than tasks: whatever the machine's pace, a cell is likely mid-way when cancelled
    spec = write_spec(slurm / "x.yaml", name="sl-cancel", epochs=6,
                      extra="grid:\n  model.shift: [none, four, eight, up]\n")
    follower = subprocess.Popen(ablate_cmd("run", str(spec), "--launcher", "slurm", "--workers", "2", "--slurm",
                                           "time=10", "--follow"), cwd=slurm, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in follower.stdout:  # until following shows a task running
        lines.append(line)
        if re.search(r"tasks: .*RUNNING", line):
            break
    job = re.search(r"submitted Slurm job (\d+)", "".join(lines))[1]
    follower.send_signal(signal.SIGINT)
    out = "".join(lines) + follower.communicate(timeout=60)[0]
    assert follower.returncode == 0 and f"stopped following; Slurm job {job} goes on" in out, out
    assert _slurm("squeue", "-h", "-j", job, "-o", "%i").split()  # Ctrl-C left the jobs running

    _wait(lambda: any(2 <= e < 5 for e, _ in _epochs_logged(slurm, "sl-cancel", unfinished=True).values()),
          "a cell mid-way", every=0.2)
    result = _cli("cancel", str(spec))
    assert result.exit_code == 0 and f"cancelled Slurm job(s) {job} (2 task(s))" in result.stdout, result.output
    # the relaunch repeats the launch's worker options
    assert f"the next launch finishes the rest: ablate run {spec} --launcher slurm --workers 2\n" in result.stdout
    assert _slurm("squeue", "-h", "-j", job, "-o", "%i").split() == []
    status = _status(spec)
    assert not status.done and status.counts["running"] == 0 and status.counts["interrupted"] == 0
    resumable = [r for r in status.rows if r.state == "waiting" and r.epoch]
    assert resumable, status.to_text()  # a cell cut mid-way waits to resume from its checkpoint
    from mlflow.tracking import MlflowClient
    parents = MlflowClient().search_runs([_cell_runs("sl-cancel")[0].info.experiment_id],
                                         "tags.`ablate.role` = 'parent'")
    assert [p.info.status for p in parents] == ["KILLED"]

    again = _launch(spec, "grid", 2)
    assert again.job != job
    _wait(lambda: _finished_and_ended(spec), "the relaunch to finish the grid", every=2.0)
    assert _finished_by_key("sl-cancel") == {c.key: 1 for c in load_spec(spec).cells()}
    logs = _logs(slurm, "sl-cancel")
    for row in resumable:  # from the last epoch reported, or the one before if killed between report and save
        resumed = re.search(rf"resuming from .*{row.key}/last.pt after epoch (\d)/6", logs)  # (none before epoch 1)
        assert (int(resumed[1]) if resumed else 0) in (row.epoch - 1, row.epoch), logs
    assert _cli("cancel", str(spec)).stdout.strip().endswith("no Slurm job of this spec is queued or running")


def test_bad_slurm_settings_exit_2_before_anything(workdir):
    """Settings are checked before Slurm is asked anything: these need no cluster."""
    spec = write_spec(workdir / "b.yaml", name="sl-bad")
    cases = [
        (["--slurm", "partiton=gpu"], "--slurm: partiton: unknown Slurm setting; did you mean partition?"),
        (["--slurm", "time=soon"], "--slurm: time: 'soon' (allowed: minutes, MM:SS, HH:MM:SS"),
        (["--slurm", "sbatch=--array=0-99"], "--slurm: sbatch: --array: ablate submits the array"),
        (["--slurm", "sbatch=--time=10"], "--slurm: sbatch: --time: it has its own key (allowed: time=...)"),
        (["--slurm", "gpus_per_task=two"], "--slurm: gpus_per_task: 'two' (allowed: a number of GPUs"),
        (["--slurm", "cpus"], "--slurm: 'cpus': not KEY=VALUE"),
        (["--devices", "0,1"], "--devices: not with --launcher slurm"),
    ]
    for args, message in cases:
        result = _cli("run", str(spec), "--launcher", "slurm", *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith(f"error: {message}"), (args, result.stderr)
    (workdir / "lab.yaml").write_text("partition: gpu\ntime: 24:00:00\nqos: normal\ngpu_per_task: 1\n")
    result = _cli("run", str(spec), "--launcher", "slurm", "--slurm-profile", "lab.yaml")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: lab.yaml:4: gpu_per_task: unknown Slurm setting; did you mean "
                                    "gpus_per_task?"), result.stderr
    result = _cli("search", str(spec), "--follow")
    assert result.exit_code == 2 and "--follow: only with --launcher slurm" in result.stderr
    # and once through a real process: exit status 2, one line, no traceback
    result = run_ablate("run", str(spec), "--slurm", "partition=gpu", cwd=workdir)
    assert result.returncode == 2 and result.stderr == ("error: --slurm: only with --launcher slurm "
                                                        "(allowed: add --launcher slurm)\n")
    _nothing_written(workdir, "b.yaml", "lab.yaml")


def test_a_profile_in_yaml_keeps_slurm_s_time_format(tmp_path):
    """YAML 1.1 reads 24:00:00 as the integer 86400; the profile means 24 hours."""
    from ablate.launch.settings import load_settings, parse_time
    profile = tmp_path / "lab.yaml"
    profile.write_text("time: 24:00:00\nsetup: [module load cuda]\nsbatch: --mail-type=FAIL\n")
    settings = load_settings(["setup=echo ready", "time=1-12"], str(profile))
    assert settings.time == 36 * 60 and settings.setup == ["module load cuda", "echo ready"]
    assert settings.sbatch_options() == {"mail-type": "FAIL"}
    assert load_settings([], str(profile)).time == 24 * 60
    assert [parse_time(t) for t in ("90", "5:30", "2:00:00", "1-0", "1-2:30", "0")] == [90, 6, 120, 1440, 1590, None]


def test_unusable_stores_and_refused_requests_exit_2_and_submit_nothing(slurm):
    spec = write_spec(slurm / "u.yaml", name="sl-unusable")
    ledger = "postgresql://lab:secret@db.invalid/ledger"
    refused = [
        # partition multi also lists a node that may come up: tasks may land on two nodes
        (["--slurm", "partition=multi"], {}, "--storage: sqlite:///ablate-ledger.db is a SQLite file, and the tasks "
                                             "may run on any of the 2 nodes of partition multi (allowed: a database"),
        (["--slurm", "partition=multi", "--storage", ledger], {}, "MLFLOW_TRACKING_URI: sqlite:///mlflow.db is a "
                                                                  "store on this machine"),
        (["--slurm", "partition=multi", "--storage", ledger, "--checkpoints", "ckpt"],
         {"MLFLOW_TRACKING_URI": "http://mlflow.invalid:5000"}, "--checkpoints: 'ckpt' is a relative path"),
        (["--slurm", "partition=nope"], {}, "--slurm: partition: 'nope' is not a partition of this cluster "
                                            "(allowed: debug, multi)"),
        (["--slurm", "gpus_per_task=3"], {}, "--slurm: Slurm refuses the request: allocation failure: Requested "
                                             "node configuration is not available"),
        (["--slurm", "qos=platinum"], {}, "--slurm: Slurm refuses the request: allocation failure: Invalid qos"),
        (["--slurm", "account=nolab"], {}, "--slurm: Slurm refuses the request: allocation failure: Invalid account"),
    ]
    for args, env, message in refused:
        result = _cli("run", str(spec), "--launcher", "slurm", "--slurm", "time=5", *args, env=env)
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert result.stderr.startswith(f"error: {message}"), (args, result.stderr)
        assert "secret" not in result.output
    _nothing_written(slurm, "u.yaml")
    assert _jobs_named("ablate-sl-unusable") == []
    # status and cancel of a spec never launched: nothing created either
    result = _cli("status", str(spec))
    assert result.exit_code == 0 and "nothing launched yet" in result.stdout, result.output
    result = _cli("cancel", str(spec))
    assert result.exit_code == 2 and "nothing to cancel" in result.stderr
    _nothing_written(slurm, "u.yaml")


@pytest.mark.slow
def test_a_cell_spans_the_processes_of_one_task(slurm):
    """--gpus-per-cell 2: each array task is one cell's group of two processes (srun tasks, rank and
    rendezvous from submitit), here CPU processes over gloo; rank 0 alone claims and records."""
    spec = write_spec(slurm / "c.yaml", name="sl-group", extra="grid:\n  model.shift: [none, four]\n")
    result = run_ablate("run", str(spec), "--launcher", "slurm", "--device", "cpu", "--gpus-per-cell", "2",
                        "--slurm", "cpus_per_task=1", "--follow", cwd=slurm, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sl-group: grid of 2 cells: 2 finished, 0 running" in result.stdout
    assert _finished_by_key("sl-group") == {c.key: 1 for c in load_spec(spec).cells()}
    logs = _logs(slurm, "sl-group")
    assert "rank 0 of a 2-process cell group on cpu" in logs and "rank 1 of a 2-process cell group" in logs
    assert logs.count("batch: 64 per step = 2 process(es) x 1 pass(es) x 32 images") == 2
    assert logs.count("training on") == 2 and "Traceback" not in logs
    assert {r.data.tags["ablate.processes"] for r in _cell_runs("sl-group")} == {"2"}


def test_cell_shapes_on_slurm_are_checked_before_anything(workdir):
    spec = write_spec(workdir / "s.yaml", name="sl-shape")
    cases = [
        ([], ["--slurm", "nodes=2"], "--slurm nodes: 2 (allowed: 1, or more with --gpus-per-cell"),
        (["--gpus-per-cell", "2"], ["--slurm", "nodes=3"], "--slurm nodes: 3 does not divide --gpus-per-cell 2"),
        (["--gpus-per-cell", "4"], ["--slurm", "nodes=2", "--slurm", "gpus_per_task=4"],
         "--slurm gpus_per_task: 4 with --gpus-per-cell 4 on 2 node(s) (allowed: 2"),
        (["--gpus-per-cell", "2"], ["--set", "train.batch_size=63"],
         "train.batch_size: 63 does not divide over --gpus-per-cell 2 processes"),
        ([], ["--slurm", "sbatch=--ntasks-per-node=4"], "--slurm: sbatch: --ntasks-per-node: each array task is one"),
    ]
    for options, settings, message in cases:
        result = _cli("run", str(spec), "--launcher", "slurm", *options, *settings)
        assert result.exit_code == 2, (options, settings, result.output)
        assert message in result.stderr.splitlines()[-1], (options, result.stderr)
    _nothing_written(workdir, "s.yaml")

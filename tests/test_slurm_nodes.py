"""A cell across two Slurm nodes (`--gpus-per-cell 2 --slurm nodes=2`), each node crashing mid-cell.

The cluster is the two-node one that `.ci/slurm.sh up --nodes 2` starts on this machine: each
slurmd in a network namespace of its own with its own host name, so the cell's two ranks talk
gloo over a real network, and the tasks reach PostgreSQL through the bridge. The module starts
it itself, under its own directory and ports, beside the single-node cluster that
tests/test_slurm.py uses, and stops it at the end. It needs root and Debian's Slurm packages;
elsewhere the test skips and says why, except under CI=true, where that is a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from ablate.spec import load_spec
from conftest import ROOT, run_ablate, write_spec
from test_postgres import ADMIN_URL, pg_databases  # noqa: F401 (a fixture)
from test_slurm import HEARTBEAT, _cell_runs, _finished_by_key, _steps, _wait

DIR = os.environ.get("ABLATE_SLURM_NODES_DIR", "/tmp/ablate-slurm-nodes")
PORT = "6837"   # slurmctld, slurmd and slurmdbd on 6837-6839: apart from the single-node cluster's 6817-6819
NET = os.environ.get("ABLATE_SLURM_NET", "10.217.0")
SCRIPT = ROOT / ".ci" / "slurm.sh"
EPOCHS = 40     # a few tenths of a second each: the cell is still mid-way after each crash


def _script(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    postgres = urlsplit(ADMIN_URL)
    env = {**os.environ, "ABLATE_SLURM_DIR": DIR, "ABLATE_SLURM_PORT": PORT, "ABLATE_SLURM_NET": NET,
           "ABLATE_SLURM_POSTGRES": f"{postgres.hostname}:{postgres.port or 5432}"}
    env.pop("SLURM_CONF", None)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _missing(problem: str):
    if os.environ.get("CI"):  # CI can start the cluster: a missing one is a failure, not a skip
        pytest.fail(f"no two-node Slurm cluster: {problem}")
    pytest.skip(f"no two-node Slurm cluster ({problem}); the test starts one itself, as root, once Slurm is "
                "installed (`.ci/slurm.sh up` installs it)")


@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster, started for this module and stopped after it."""
    if os.geteuid() != 0:
        _missing("not root: the nodes are network namespaces")
    if not all(shutil.which(daemon) for daemon in ("slurmctld", "slurmd", "slurmdbd", "munged")):
        _missing("Debian's Slurm packages are not installed")
    up = _script("up", "--nodes", "2")
    if up.returncode:
        _script("down")
        lines = up.stderr.strip().splitlines() or ["?"]
        _missing(f"`.ci/slurm.sh up --nodes 2` failed: {next((line for line in lines if 'FATAL' in line), lines[-1])}")
    try:
        yield os.path.join(DIR, "etc", "slurm.conf")
    finally:
        _script("down")


@pytest.fixture
def nodes(cluster, workdir, pg_databases, monkeypatch):  # noqa: F811 (the fixture imported above)
    """The two-node cluster, with this test's stores in the environment the tasks inherit: PostgreSQL
    as the nodes reach it, at the bridge's address."""
    monkeypatch.setenv("SLURM_CONF", cluster)
    monkeypatch.setenv("ABLATE_HEARTBEAT", HEARTBEAT)
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    ledger, tracking = (_via_bridge(url) for url in pg_databases)
    monkeypatch.setenv("ABLATE_STORAGE", ledger)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    return workdir


def _via_bridge(url: str) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user + '@' if user else ''}{NET}.1:{parts.port or 5432}"))


def _slurm(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True, timeout=60).stdout


def _log(folder: Path, job: str, rank: int) -> str:
    """What rank ``rank`` printed, over every run of the job (submitit appends)."""
    path = folder / f"{job}_{rank}_log.out"
    return path.read_text() if path.exists() else ""


def _epochs(text: str, since: str = "") -> list[int]:
    """The epochs logged (``since``: only after the last line that holds it)."""
    return [int(e) for e in re.findall(r"^\s+epoch (\d+)/", text.rpartition(since)[2] if since else text, re.M)]


def _crash(node: str, job: str) -> None:
    """``node`` loses power mid-cell; slurmctld is told at once (it would itself after SlurmdTimeout)
    and requeues the job, whose next run waits for the node to come back."""
    assert _script("crash", node).returncode == 0
    _slurm("scontrol", "update", f"nodename={node}", "state=down", "reason=crashed")
    _wait(lambda: _slurm("squeue", "-h", "-j", job, "-o", "%T").strip() == "PENDING", f"job {job} requeued",
          timeout=60, every=0.5)
    revived = _script("revive", node)
    assert revived.returncode == 0, revived.stderr


@pytest.mark.slow
def test_a_cell_across_two_nodes_resumes_from_its_checkpoint_after_either_node_crashes(nodes):
    spec = write_spec(nodes / "n.yaml", name="sl-nodes", epochs=EPOCHS)
    [key] = [c.key for c in load_spec(spec).cells()]
    result = run_ablate("run", str(spec), "--launcher", "slurm", "--gpus-per-cell", "2", "--slurm", "nodes=2",
                        "--device", "cpu", cwd=nodes, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    job = re.search(r"submitted Slurm job (\d+): 1 task\(s\)", result.stdout)[1]
    folder = nodes / "slurm-logs" / "sl-nodes"

    # a checkpoint to resume from (epoch 2 is logged once epoch 1's is written), then node2 dies,
    # rank 1 with it
    checkpoint = nodes / "checkpoints" / "sl-nodes" / key / "last.pt"
    _wait(lambda: len(_epochs(_log(folder, job, 0))) >= 2 and checkpoint.exists(), "two epochs on two nodes",
          every=0.2)
    _crash("node2", job)
    # the requeued job resumes the cell, then node1 dies: rank 0 with the cell's trial still RUNNING
    # and its MLflow run open, which the job's next run takes back
    _wait(lambda: len(_epochs(_log(folder, job, 0), since="resuming from")) >= 2
          and _log(folder, job, 0).count("resuming from") == 1, "two epochs after the first resume", every=0.2)
    _crash("node1", job)
    _wait(lambda: _slurm("sacct", "-n", "-X", "-j", job, "-o", "State").strip() == "COMPLETED",
          "the job to finish", every=1.0)

    rank0, rank1 = _log(folder, job, 0), _log(folder, job, 1)
    # three runs of the one task, each with its two ranks on the two nodes
    placed = [re.findall(rf"^(?:\[rank 1\] )?task {job} on (node\d): rank {r} of a 2-process cell group", text, re.M)
              for r, text in ((0, rank0), (1, rank1))]
    assert len(placed[0]) == len(placed[1]) == 3, (rank0, rank1)
    assert all({a, b} == {"node1", "node2"} for a, b in zip(*placed)), placed
    assert _slurm("sacct", "-n", "-X", "-j", job, "-o", "NodeList").split() == ["node[1-2]"]
    # each later run resumed from the checkpoint the crash left, never from epoch 0
    resumed = [int(e) for e in re.findall(rf"resuming from .*{key}/last.pt after epoch (\d+)/{EPOCHS}", rank0)]
    assert len(resumed) == 2 and 1 <= resumed[0] < resumed[1], rank0
    assert rank0.count(f"epoch 1/{EPOCHS} ") == 1 and rank0.count("training on cpu") == 1, rank0
    assert rank0.count(f"cell {key} (trial") == 3 and rank0.count("resuming on cpu") == 2, rank0
    # rank 0 outlived node2 (its group broke, or Slurm stopped it first); it died with node1, and the
    # job's next run handed back the trial it held
    assert "released trial(s) [" in rank0, rank0
    # and the cell finished exactly once: one MLflow run, finished, with every epoch; one trial complete
    assert [r.data.tags["ablate.cell_key"] for r in _cell_runs("sl-nodes")] == [key]
    assert _finished_by_key("sl-nodes") == {key: 1} and _steps("sl-nodes", key) == list(range(1, EPOCHS + 1))
    from optuna.trial import TrialState

    from ablate.ledger import Ledger
    trials = [t for t in Ledger(os.environ["ABLATE_STORAGE"], "sl-nodes").trials()
              if t.user_attrs.get("ablate.cell_key") == key]
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 1, trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], trials
    assert "Traceback" not in rank0 + rank1, rank0 + rank1

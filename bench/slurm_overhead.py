"""What a Slurm launch costs over a local start, and how long `ablate status` takes.

On the cluster that ``SLURM_CONF`` names (``.ci/slurm.sh up`` starts one on this machine), with
a one-cell digits spec and fresh SQLite stores in a temp dir, measured in the same run:

* ``local_to_first_epoch_s``: ``ablate run SPEC`` from start to its first epoch line (the peer);
* ``slurm_submit_s``: ``ablate run SPEC --launcher slurm`` from start until it returns;
* ``slurm_to_first_epoch_s``: from the same start until the task's log shows its first epoch;
* ``slurm_overhead_s`` and ``slurm_over_local``: the difference and the ratio of the two;
* ``status_s`` / ``status_json_s``: ``ablate status SPEC`` (and ``--json``) wall time, median
  of ``--repeats`` calls, once the job has ended (they include the interpreter's start-up).

Prints ``name: value`` lines. Wall-clock times: run it on a quiet machine.

    .ci/slurm.sh up && export SLURM_CONF=/tmp/ablate-slurm/etc/slurm.conf
    python bench/slurm_overhead.py --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = """\
name: bench-slurm
data: {name: digits}
model: {image_size: 8, patch_size: 2, width: 16, depth: 1, mlp_ratio: 2, shift: four}
train: {epochs: 2, batch_size: 64, lr: 3.0e-3, warmup_epochs: 0, hflip: 0, crop_scale: 0.8}
"""


def ablate(*args: str) -> list[str]:
    return [sys.executable, "-m", "ablate", *args]


def fresh_dir(root: Path, name: str) -> tuple[Path, dict]:
    work = root / name
    work.mkdir()
    (work / "spec.yaml").write_text(SPEC)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "ABLATE_STORAGE": f"sqlite:///{work / 'ablate-ledger.db'}", "ABLATE_CHECKPOINTS": str(work / "ckpt")}
    return work, env


def local_to_first_epoch(root: Path) -> float:
    work, env = fresh_dir(root, "local")
    start = time.perf_counter()
    proc = subprocess.Popen(ablate("run", "spec.yaml", "--device", "cpu"), cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "epoch 1/" in line:
            elapsed = time.perf_counter() - start
            break
    else:
        raise SystemExit(f"local run ended without an epoch (exit {proc.wait()})")
    proc.communicate()
    return elapsed


def slurm_launch(root: Path) -> tuple[float, float, Path, dict]:
    work, env = fresh_dir(root, "slurm")
    start = time.perf_counter()
    subprocess.run(ablate("run", "spec.yaml", "--launcher", "slurm", "--slurm", "time=10"), cwd=work, env=env,
                   check=True, capture_output=True, text=True)
    submitted = time.perf_counter() - start
    logs = work / "slurm-logs" / "bench-slurm"
    while not any("epoch 1/" in p.read_text() for p in logs.glob("*_log.out")):
        if time.perf_counter() - start > 600:
            raise SystemExit("no epoch in the task's log after 10 minutes")
        time.sleep(0.05)
    first_epoch = time.perf_counter() - start
    while "done, top-1" not in "".join(p.read_text() for p in logs.glob("*_log.out")):
        time.sleep(0.2)
    while subprocess.run(["squeue", "-h", "-n", "ablate-bench-slurm"], capture_output=True, text=True).stdout.strip():
        time.sleep(0.2)
    return submitted, first_epoch, work, env


def timed(command: list[str], work: Path, env: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=work, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="status calls to take the median of")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local = local_to_first_epoch(root)
        submitted, first_epoch, work, env = slurm_launch(root)
        status = timed(ablate("status", "spec.yaml"), work, env, args.repeats)
        status_json = timed(ablate("status", "spec.yaml", "--json"), work, env, args.repeats)
        python = timed([sys.executable, "-c", "import ablate"], work, env, args.repeats)
    print(f"local_to_first_epoch_s: {local:.2f}")
    print(f"slurm_submit_s: {submitted:.2f}")
    print(f"slurm_to_first_epoch_s: {first_epoch:.2f}")
    print(f"slurm_overhead_s: {first_epoch - local:.2f}")
    print(f"slurm_over_local: {first_epoch / local:.2f}")
    print(f"status_s: {status:.2f}")
    print(f"status_json_s: {status_json:.2f}")
    print(f"import_ablate_s: {python:.2f}")
    print(f"load_average_1min: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

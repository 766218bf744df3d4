"""What choosing, recording and reporting cells costs as a grid grows: 1k, 10k and 100k cells.

Every cell's training is replaced by one that finishes at once (bench/noop_cells.py), so what is
measured is the orchestration: the ledger's claim, heartbeat and record, the cell's MLflow run.
For each ledger store (a SQLite file; a fresh PostgreSQL database, MLflow's store beside it in
another), each grid size and each worker count, in a fresh folder:

* ``queue_s``: from ``ablate run`` to the first cell's start (loading the spec, the stores,
  queueing every cell);
* ``claims_per_s``: cells finished per second over the first ``--cells`` cells after that (the
  run is then stopped with SIGTERM, as Slurm stops a job);
* ``per_cell_ms``: worker-milliseconds per cell (workers / claims_per_s);
* ``status_s``: ``ablate status SPEC`` wall time (the interpreter's start included) on the grid
  as it was left;
* ``ledger_mb``: the ledger's size.

and, per store and worker count, ``per_cell_100k_over_1k``: the per-cell cost of the largest grid
over the smallest's (the target is at most 1.5). Prints one table; wall-clock times, so run it on
a quiet machine.

    python bench/orchestration.py                      # 1k, 10k, 100k x 2, 8 workers x sqlite, postgresql
    python bench/orchestration.py --sizes 1000,10000 --stores sqlite --workers 2
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
PG_ADMIN = os.environ.get("ABLATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def spec_text(cells: int) -> str:
    """A digits grid of ``cells`` cells: 100 seeds times ``cells / 100`` learning rates (a short file)."""
    lrs = ", ".join(f"{(i + 1) * 1e-6:.6e}" for i in range(cells // 100))
    return (f"name: orch{cells}\ndata: {{name: digits}}\n"
            "model: {image_size: 16, patch_size: 4, width: 32, depth: 1}\ntrain: {epochs: 1}\n"
            f"grid:\n  train.lr: [{lrs}]\nseeds: [{', '.join(str(s) for s in range(100))}]\n")


class Stores:
    """A fresh ledger and MLflow store of one kind, removed afterwards."""

    def __init__(self, kind: str, work: Path):
        self.kind, self.work, self.dbs = kind, work, []
        if kind == "sqlite":
            self.ledger, self.mlflow = f"sqlite:///{work / 'ledger.db'}", f"sqlite:///{work / 'mlflow.db'}"
        else:
            tag = uuid.uuid4().hex[:8]
            self.dbs = [f"ablate_bench_{tag}_ledger", f"ablate_bench_{tag}_mlflow"]
            for db in self.dbs:
                _pg(f'CREATE DATABASE "{db}"')
            base = PG_ADMIN.rsplit("/", 1)[0]
            self.ledger, self.mlflow = (f"{base}/{db}" for db in self.dbs)

    def ledger_mb(self) -> float:
        if self.kind == "sqlite":
            return sum(p.stat().st_size for p in self.work.glob("ledger.db*")) / 1e6
        return float(_pg(f"SELECT pg_database_size('{self.dbs[0]}')", fetch=True)) / 1e6

    def drop(self) -> None:
        for db in self.dbs:
            _pg(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _pg(sql: str, fetch: bool = False):
    import sqlalchemy
    engine = sqlalchemy.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            result = conn.execute(sqlalchemy.text(sql))
            return result.scalar() if fetch else None
    finally:
        engine.dispose()


def measure(kind: str, cells: int, workers: int, measured: int, root: Path) -> dict:
    work = root / f"{kind}-{cells}-{workers}"
    work.mkdir()
    (work / "spec.yaml").write_text(spec_text(cells))
    stores = Stores(kind, work)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": stores.mlflow,
           "ABLATE_STORAGE": stores.ledger, "ABLATE_CHECKPOINTS": str(work / "ckpt")}
    try:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(HERE / "noop_cells.py"), "run", "spec.yaml",
                                 "--workers", str(workers), "--device", "cpu"],
                                cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = last = None
        done = 0
        for line in proc.stdout:
            if first is None and "training on" in line:
                first = time.perf_counter()
            elif "done, top-1" in line:
                done += 1
                last = time.perf_counter()
                if done == 1:
                    counted_from = last
                if done > measured:
                    break
        if done <= measured:
            raise SystemExit(f"{work}: the run ended after {done} cells (exit {proc.wait()})")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
        rate = (done - 1) / (last - counted_from)
        t = time.perf_counter()
        status = subprocess.run([sys.executable, "-m", "ablate", "status", "spec.yaml"], cwd=work, env=env,
                                capture_output=True, text=True)
        status_s = time.perf_counter() - t
        if status.returncode != 0:
            raise SystemExit(f"{work}: ablate status failed: {status.stderr.strip()}")
        return {"store": kind, "cells": cells, "workers": workers, "queue_s": first - start,
                "claims_per_s": rate, "per_cell_ms": 1000 * workers / rate, "status_s": status_s,
                "ledger_mb": stores.ledger_mb()}
    finally:
        stores.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--workers", default="2,8")
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--cells", type=int, default=300, help="cells finished per measurement")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    header = f"{'store':<11}{'cells':>8}{'workers':>8}{'queue_s':>9}{'claims/s':>10}{'per_cell_ms':>12}" \
             f"{'status_s':>10}{'ledger_mb':>10}"
    print(header, flush=True)
    cores = len(os.sched_getaffinity(0))
    counts = [int(w) for w in args.workers.split(",")]
    for w in (w for w in counts if w > cores):
        print(f"skipped: {w} workers on {cores} cores (ablate run refuses more workers than cores)", flush=True)
    counts = [w for w in counts if w <= cores]
    with tempfile.TemporaryDirectory(prefix="ablate-orch-") as tmp:
        for kind in args.stores.split(","):
            for workers in counts:
                for cells in sizes:
                    r = measure(kind, cells, workers, args.cells, Path(tmp))
                    rows.append(r)
                    print(f"{r['store']:<11}{r['cells']:>8}{r['workers']:>8}{r['queue_s']:>9.1f}"
                          f"{r['claims_per_s']:>10.2f}{r['per_cell_ms']:>12.0f}{r['status_s']:>10.2f}"
                          f"{r['ledger_mb']:>10.1f}", flush=True)
    for kind in args.stores.split(","):
        for workers in counts:
            mine = {r["cells"]: r for r in rows if r["store"] == kind and r["workers"] == workers}
            ratio = mine[max(sizes)]["per_cell_ms"] / mine[min(sizes)]["per_cell_ms"]
            print(f"per_cell_{max(sizes) // 1000}k_over_{min(sizes) // 1000}k[{kind}, {workers} workers]: {ratio:.2f}")


if __name__ == "__main__":
    main()

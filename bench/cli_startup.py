"""Start-up time of the ``ablate`` command line against Python itself and against ``import torch``.

Every command runs in a fresh interpreter (``python -m ablate ...``, as the console script does),
interleaved with the two peers so that a machine whose load changes slows all alike; each figure
is the fastest of the repeats (``--stat median`` for the median). Prints ``name: value`` lines:

* seconds of ``python -c pass`` (the floor) and ``python -c "import torch"`` (what a command that
  imports torch pays before doing anything);
* seconds of ``ablate --help``, ``ablate spec-help``, ``ablate plan`` on the quickstart and on a
  paper spec (its data root unset), each with its ratio to the floor and to ``import torch``;
* whether each command loaded torch or timm (``-X importtime`` lists every module imported).

Targets on the development machine (2 shared cores): ``--help`` under 0.5 s, ``plan`` on the
quickstart under 1.5 s, neither importing torch.

    python bench/cli_startup.py
    python bench/cli_startup.py --repeats 9 --stat median
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PEERS = {
    "python -c pass": ["-c", "pass"],
    "python -c 'import torch'": ["-c", "import torch"],
}
COMMANDS = {
    "ablate --help": ["-m", "ablate", "--help"],
    "ablate spec-help": ["-m", "ablate", "spec-help"],
    "ablate plan quickstart": ["-m", "ablate", "plan", "experiments/quickstart.yaml"],
    "ablate plan paper/shift-patterns (no data)": ["-m", "ablate", "plan", "experiments/paper/shift-patterns.yaml"],
}
TARGETS = {"ablate --help": 0.5, "ablate plan quickstart": 1.5}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each command")
    p.add_argument("--stat", choices=["min", "median"], default="min",
                   help="summary of the repeats: min (the least disturbed sample on a shared machine) or median")
    return p.parse_args()


def environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("IMAGENET100_ROOT", None)  # plan a paper spec as before the data is in place
    return env


def timed(args: list[str], env: dict[str, str], failures: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:  # timed all the same (a refusal is what a user waits for), and said
        failures[" ".join(args)] = f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1]}"
    return elapsed


def heavy_imports(args: list[str], env: dict[str, str]) -> list[str]:
    """Which of torch and timm the command imported (``-X importtime`` writes one line per module)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return [m for m in ("torch", "timm") if m in modules]


def main() -> None:
    opts = parse_args()
    env = environment()
    every = {**PEERS, **COMMANDS}
    times: dict[str, list[float]] = {name: [] for name in every}
    failures: dict[str, str] = {}
    for name, args in every.items():  # warm the file cache once
        timed(args, env, failures)
    for _ in range(opts.repeats):
        for name, args in every.items():
            times[name].append(timed(args, env, failures))
    summary = min if opts.stat == "min" else statistics.median
    seconds = {name: summary(ts) for name, ts in times.items()}
    floor, torch_s = seconds["python -c pass"], seconds["python -c 'import torch'"]
    print(f"python: {sys.version.split()[0]}; cores: {os.cpu_count()}; repeats: {opts.repeats}; stat: {opts.stat}")
    for name in PEERS:
        print(f"{name}: {seconds[name]:.3f} s")
    for name, args in COMMANDS.items():
        target = f"; target < {TARGETS[name]} s" if name in TARGETS else ""
        loaded = heavy_imports(args, env)
        print(f"{name}: {seconds[name]:.3f} s  ({seconds[name] / floor:.1f}x python, "
              f"{seconds[name] / torch_s:.2f}x import torch; imports {', '.join(loaded) or 'neither torch nor timm'}"
              f"{target})" + (f"  [{failures[' '.join(args)]}]" if " ".join(args) in failures else ""))


if __name__ == "__main__":
    main()

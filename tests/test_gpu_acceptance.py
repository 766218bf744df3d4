"""bench/gpu_acceptance.py keeps working on a machine without a GPU: its code paths, tiny, on a CPU."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # generates a 100-class tree and builds its cache: about half a minute
def test_gpu_acceptance_smoke_run_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_acceptance.py"), "--smoke", "--device", "cpu",
                           "--no-compile", "--skip-rehearsal", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert float(lines["step_eager_images_per_second"]) > 0
    assert lines["data_loader"].startswith("cache (100 train images, randaugment rand-m9-mstd0.5-inc1")
    assert float(lines["data_images_per_second"]) > 0
    assert 0 <= float(lines["data_wait_share_blocked"].rstrip("%")) <= 100
    assert lines["data_images_per_second_target"].endswith("n/a (smoke run)")
    # the trainer users run, measured beside the ideal step
    assert float(lines["trainer_images_per_second"]) > 0 and float(lines["trainer_over_ideal"]) > 0
    assert 0 <= float(lines["trainer_data_wait_share"].rstrip("%")) <= 100


def test_gpu_acceptance_refuses_a_machine_without_cuda():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_acceptance.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "no CUDA device here" in proc.stderr

"""Shared fixtures: every test gets its own working directory with its own MLflow and ledger stores."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A clean cwd whose stores (mlflow.db, ablate-ledger.db, checkpoints/) are all inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("ABLATE_STORAGE", f"sqlite:///{tmp_path / 'ablate-ledger.db'}")
    monkeypatch.setenv("ABLATE_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.delenv("ABLATE_HEARTBEAT", raising=False)
    return tmp_path


TINY = """\
name: {name}
data: {{name: digits}}
model: {{image_size: 8, patch_size: 2, width: 16, depth: 1, mlp_ratio: 2, shift: four}}
train: {{epochs: {epochs}, batch_size: 64, lr: 3.0e-3, warmup_epochs: 0, hflip: 0, crop_scale: 0.8}}
"""


def write_spec(path: Path, name: str = "tiny", epochs: int = 2, extra: str = "") -> Path:
    """A tiny digits spec that trains in about a second per epoch on a CPU."""
    path.write_text(TINY.format(name=name, epochs=epochs) + textwrap.dedent(extra))
    return path


def ablate_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ablate", *args]


def run_ablate(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(ablate_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)

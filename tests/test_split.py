"""Split invariance: a cell trains the same whatever the split of its global batch over micro-batches
and processes (ablate/batching.py); out-of-memory halves the micro-batch; no per-step host reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ablate import train
from ablate.batching import BatchSplit, shard_positions
from ablate.cell_group import free_port
from ablate.config import CellConfig
from ablate.memory import MicroBatchMemory

CPU = torch.device("cpu")
HERE = Path(__file__).resolve().parent
#: fp32 sums taken in another order: the weights after 2 epochs (44 steps) agree to this
WEIGHT_TOLERANCE = 1e-4

DEIT = {"randaugment": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25,
        "label_smoothing": 0.1, "hflip": 0.5, "crop_scale": 0.08}


def _cfg(**train_settings) -> CellConfig:
    return CellConfig.model_validate({
        "data": {"name": "digits"},
        "model": {"image_size": 8, "patch_size": 2, "width": 16, "depth": 1, "mlp_ratio": 2},
        "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 1, "hflip": 0, "crop_scale": 1.0,
                  **train_settings}})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "last.pt", weights_only=True)["model"]


def _recording(monkeypatch) -> list:
    seen = []
    real = train._pass

    def recording(forward, criterion, images, targets, *args):
        seen.append((images.clone(), targets.clone()))
        return real(forward, criterion, images, targets, *args)
    monkeypatch.setattr(train, "_pass", recording)
    return seen


def _gloo(cfg: CellConfig, folder: Path, processes: int = 2, record: bool = False) -> list[Path]:
    """Train ``cfg`` with ``processes`` CPU processes over gloo; the files each rank recorded."""
    address = f"tcp://127.0.0.1:{free_port()}"
    records = [folder / f"rank{r}.pt" for r in range(processes)] if record else []
    procs = [subprocess.Popen([sys.executable, str(HERE / "split_worker.py"), str(r), str(processes), address,
                               json.dumps(cfg.model_dump(mode="json")), str(folder),
                               *([str(records[r])] if record else [])],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(processes)]
    assert [p.wait(timeout=300) for p in procs] == [0] * processes
    return records


def _global_batches(passes: list, splits: list[BatchSplit]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Reassemble the global batches from the passes of each rank (one list per split)."""
    per_rank = [iter(p) for p in passes]
    out = []
    steps = len(passes[0]) // splits[0].accum
    for _ in range(steps):
        xs, ys = [], []
        for it, split in zip(per_rank, splits):
            for _ in range(split.accum):
                x, y = next(it)
                xs.append(x)
                ys.append(y)
        x, y = torch.cat(xs), torch.cat(ys)
        order = torch.cat([s.positions() if s.positions() is not None else torch.arange(s.batch) for s in splits])
        gx, gy = torch.empty_like(x), torch.empty_like(y)
        gx[order], gy[order] = x, y
        out.append((gx, gy))
    return out


def test_every_shard_keeps_mixup_s_pairs():
    for batch, shards in ((32, 4), (32, 2), (8, 4), (12, 3)):
        for s in range(shards):
            pos = shard_positions(batch, shards, s)
            assert [batch - 1 - p for p in pos] == pos[::-1]  # flip(0) of the shard = flip(0) of the batch
    split = BatchSplit(32, 8, processes=2, rank=1)
    assert split.accum == 2 and sorted(split.positions().tolist()) == list(range(8, 16)) + list(range(16, 24))
    with pytest.raises(ValueError):
        BatchSplit(32, 6)


def test_same_weights_as_one_pass_four_passes_and_two_processes(tmp_path):
    one = tmp_path / "1x32"
    train.train_cell(_cfg(), device=CPU, checkpoint_dir=one, log=lambda m: None)
    four = tmp_path / "4x8"
    train.train_cell(_cfg(micro_batch=8), device=CPU, checkpoint_dir=four, log=lambda m: None)
    two = tmp_path / "2x2x8"
    _gloo(_cfg(micro_batch=8), two)
    reference = _weights(one)
    for other in (four, two):
        weights = _weights(other)
        for name, value in reference.items():
            torch.testing.assert_close(weights[name], value, atol=WEIGHT_TOLERANCE, rtol=0, msg=f"{other.name} {name}")
    # and a split does change the numbers a little: the comparison above is not of one run with itself
    assert any(not torch.equal(_weights(four)[n], v) for n, v in reference.items())


def test_bit_identical_inputs_under_the_deit_recipe(tmp_path, monkeypatch):
    cfg = _cfg(epochs=1, **DEIT)
    seen_whole = _recording(monkeypatch)
    train.train_cell(cfg, device=CPU, checkpoint_dir=tmp_path / "whole", log=lambda m: None)
    whole = _global_batches([list(seen_whole)], [BatchSplit(32, 32)])
    seen_whole.clear()
    train.train_cell(_cfg(epochs=1, micro_batch=8, **DEIT), device=CPU, checkpoint_dir=tmp_path / "micro",
                     log=lambda m: None)
    micro = _global_batches([list(seen_whole)], [BatchSplit(32, 8)])
    records = _gloo(_cfg(epochs=1, micro_batch=8, **DEIT), tmp_path / "gloo", record=True)
    ranks = _global_batches([torch.load(r, weights_only=True) for r in records],
                            [BatchSplit(32, 8, 2, rank) for rank in range(2)])
    assert len(whole) == len(micro) == len(ranks) == 1437 // 32
    for (x, y), (mx, my), (rx, ry) in zip(whole, micro, ranks):
        assert torch.equal(x, mx) and torch.equal(y, my)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert not torch.equal(whole[0][1], whole[1][1])  # Mixup made soft targets that differ per batch


def test_out_of_memory_above_a_micro_batch_halves_it_and_the_cell_finishes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = train._pass

    def small_gpu(forward, criterion, images, targets, *args):
        if images.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(forward, criterion, images, targets, *args)

    train.train_cell(_cfg(epochs=1), device=CPU, checkpoint_dir=tmp_path / "whole", log=lambda m: None)
    monkeypatch.setattr(train, "_pass", small_gpu)
    lines = []
    metrics = train.train_cell(_cfg(epochs=1), device=CPU, checkpoint_dir=tmp_path / "small", log=lines.append)
    said = [line for line in lines if "out of memory" in line]
    assert len(said) == 2 and "micro-batch 32" in said[0] and "micro-batch 16" in said[1], said
    assert "micro-batch 8" in said[1]
    assert metrics["epochs"] == 1
    for name, value in _weights(tmp_path / "whole").items():
        torch.testing.assert_close(_weights(tmp_path / "small")[name], value, atol=WEIGHT_TOLERANCE, rtol=0)
    assert MicroBatchMemory().get(MicroBatchMemory.key(_cfg(epochs=1), "cpu")) == 8  # the next cell starts at 8
    lines.clear()
    train.train_cell(_cfg(seed=1, epochs=1), device=CPU, checkpoint_dir=tmp_path / "next", log=lines.append)
    assert not [line for line in lines if "out of memory" in line]
    # an explicit micro-batch that does not fit is the cell's failure, not something to change
    with pytest.raises(torch.OutOfMemoryError):
        train.train_cell(_cfg(micro_batch=16, epochs=1), device=CPU, checkpoint_dir=tmp_path / "fixed",
                         log=lambda m: None)


def test_out_of_memory_mid_cell_resumes_from_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real, steps = train._pass, []

    def fills_up_in_epoch_two(forward, criterion, images, targets, *args):
        steps.append(images.shape[0])
        if len(steps) > 50 and images.shape[0] > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(forward, criterion, images, targets, *args)

    monkeypatch.setattr(train, "_pass", fills_up_in_epoch_two)
    lines = []
    train.train_cell(_cfg(epochs=3), device=CPU, checkpoint_dir=tmp_path, log=lines.append)
    assert any("continuing with micro-batch 16 from the last checkpoint (epoch 1)" in line for line in lines), lines
    assert sum(1 for line in lines if line.startswith("epoch 2/3")) == 1


def test_no_host_reads_per_step(tmp_path, monkeypatch):
    """Count the reads of a tensor's value on the host made by train.py: a constant per epoch,
    whatever the number of steps (each read stalls a GPU's queue)."""
    import inspect

    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name):
            caller = inspect.currentframe().f_back
            if caller.f_code.co_filename == train.__file__:
                reads.append((_name, caller.f_lineno))
            return _real(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counting)

    for batch in (16, 64):  # 89 and 22 steps an epoch
        reads.clear()
        train.train_cell(_cfg(batch_size=batch, epochs=2), device=CPU, checkpoint_dir=tmp_path / str(batch),
                         log=lambda m: None)
        steps = 2 * (1437 // batch)
        # per epoch: the loss check, the loss sums, evaluation's sums (validation, then the training
        # subset), the weights check; and one check of the loss every LOG_EVERY steps, never one per step
        assert len(reads) == 2 * 5 + steps // train.LOG_EVERY, (batch, reads)


def test_activation_checkpointing_trains_the_same_cell(tmp_path, monkeypatch):
    from ablate.models import s2mlp

    calls = []
    real = s2mlp.checkpoint_seq
    monkeypatch.setattr(s2mlp, "checkpoint_seq", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    train.train_cell(_cfg(epochs=1), device=CPU, checkpoint_dir=plain, log=lambda m: None)
    lines = []
    train.train_cell(_cfg(epochs=1, grad_checkpointing=True, micro_batch=16), device=CPU, checkpoint_dir=ckpt,
                     log=lines.append)
    assert any("activation checkpointing" in line for line in lines)
    # every training pass (2 a step), validation batch and batch of the training subset (the whole split here)
    assert len(calls) == 2 * (1437 // 32) + -(-360 // 32) + -(-1437 // 32)
    for name, value in _weights(plain).items():
        torch.testing.assert_close(_weights(ckpt)[name], value, atol=WEIGHT_TOLERANCE, rtol=0)

"""One cell's training loop: seeded determinism on CPU, exact resume, failures with reasons."""
from __future__ import annotations

import pytest
import torch

from ablate.config import CellConfig
from ablate.train import CellFailed, train_cell

CPU = torch.device("cpu")


def _cfg(**train) -> CellConfig:
    return CellConfig.model_validate({
        "data": {"name": "digits"},
        "model": {"image_size": 8, "patch_size": 2, "width": 16, "depth": 1, "mlp_ratio": 2},
        "train": {"epochs": 3, "batch_size": 64, "lr": 3e-3, "warmup_epochs": 1, "hflip": 0.5,
                  "crop_scale": 0.6, "mixup": 0.2, **train}})


class Interrupt(Exception):
    pass


def test_same_cell_twice_gives_the_same_metrics(tmp_path):
    a = train_cell(_cfg(), device=CPU, checkpoint_dir=tmp_path / "a", log=lambda m: None)
    b = train_cell(_cfg(), device=CPU, checkpoint_dir=tmp_path / "b", log=lambda m: None)
    for k in ("val_top1", "val_top5", "val_loss", "train_loss"):
        assert a[k] == b[k], k
    c = train_cell(_cfg(seed=1), device=CPU, checkpoint_dir=tmp_path / "c", log=lambda m: None)
    assert c["train_loss"] != a["train_loss"]


def test_interrupted_cell_resumes_to_the_uninterrupted_result(tmp_path):
    whole = train_cell(_cfg(), device=CPU, checkpoint_dir=tmp_path / "whole", log=lambda m: None)

    def stop_in_second(stats):  # reported before its checkpoint: epoch 2 is lost, epoch 1 kept
        if stats.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_cell(_cfg(), device=CPU, checkpoint_dir=tmp_path / "cut", on_epoch=stop_in_second,
                   log=lambda m: None)
    lines = []
    resumed = train_cell(_cfg(), device=CPU, checkpoint_dir=tmp_path / "cut", log=lines.append)
    assert any("resuming" in line and "after epoch 1/3" in line for line in lines)
    assert sum(line.startswith("epoch") for line in lines) == 2  # only epochs 2 and 3 were trained
    for k in ("val_top1", "val_top5", "val_loss", "train_loss"):
        assert resumed[k] == pytest.approx(whole[k], abs=1e-6), k


def test_non_finite_loss_fails_the_cell(tmp_path):
    with pytest.raises(CellFailed, match="non-finite loss"):
        train_cell(_cfg(lr=1e30, warmup_epochs=0, mixup=0.0), device=CPU, checkpoint_dir=tmp_path,
                   log=lambda m: None)


def test_final_metrics_carry_cost(tmp_path):
    m = train_cell(_cfg(epochs=1), device=CPU, checkpoint_dir=tmp_path, log=lambda m: None)
    from ablate.models.cost import model_cost
    cost = model_cost(_cfg().model, 10)
    assert (m["macs"], m["flops"], m["params"]) == (cost.macs, 2 * cost.macs, cost.params)
    assert m["images_per_second"] > 0 and m["train_seconds"] > 0 and m["skipped_images"] == 0


def test_cpu_trains_in_fp32_and_says_so(tmp_path):
    tags, lines = {}, []
    train_cell(_cfg(epochs=1, amp="bf16"), device=CPU, checkpoint_dir=tmp_path, on_start=tags.update,
               log=lines.append)
    assert tags["ablate.precision"] == "fp32"
    assert any("precision: fp32 (train.amp bf16 applies on CUDA only)" in line for line in lines)


def test_bf16_autocast_path_runs_on_cpu():
    """The step CUDA runs under bf16 autocast (shift's custom backward included), run on a CPU."""
    from ablate.models.s2mlp import build_model
    cfg = _cfg().model.model_copy(update={"width": 32, "depth": 2, "shift": "eight"})
    torch.manual_seed(0)
    model = build_model(cfg, 10)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    grads = {}
    for dtype in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
        assert logits.dtype == (dtype or torch.float32)
        loss.backward()
        grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(grads[torch.bfloat16]).all()
    cos = torch.nn.functional.cosine_similarity(grads[None], grads[torch.bfloat16], dim=0)
    assert cos > 0.99, cos  # bf16 keeps 8 bits of mantissa: same direction, not the same digits


@pytest.mark.slow  # inductor compiles the model on a CPU: tens of seconds
def test_compiled_cell_matches_eager(tmp_path):
    eager = train_cell(_cfg(epochs=2, mixup=0.0), device=CPU, checkpoint_dir=tmp_path / "eager", log=lambda m: None)
    compiled = train_cell(_cfg(epochs=2, mixup=0.0, compile=True), device=CPU, checkpoint_dir=tmp_path / "compiled",
                          log=lambda m: None)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=2e-3)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=2e-3)
    assert abs(compiled["val_top1"] - eager["val_top1"]) <= 1.0  # a few of 360 images may flip


def test_every_run_records_what_its_training_cost(tmp_path, monkeypatch):
    m = train_cell(_cfg(epochs=1), device=CPU, checkpoint_dir=tmp_path / "a", log=lambda m: None)
    assert m["tflops"] > 0 and m["peak_memory_gb"] > 0 and 0 <= m["data_wait_share"] < 1
    assert m["gpu_hours"] == m["train_seconds"] / 3600  # one process: device-hours are its wall hours
    assert "mfu" not in m  # a CPU has no known peak: MFU is not guessed
    monkeypatch.setenv("ABLATE_PEAK_TFLOPS", "0.5")
    epochs = []
    m = train_cell(_cfg(epochs=1), device=CPU, checkpoint_dir=tmp_path / "b", log=lambda m: None,
                   on_epoch=epochs.append)
    assert m["mfu"] == pytest.approx(m["tflops"] / 0.5)
    assert set(epochs[0].metrics()) >= {"images_per_second", "tflops", "mfu", "peak_memory_gb", "data_wait_share"}
    monkeypatch.setenv("ABLATE_PEAK_TFLOPS", "fast")
    from ablate.errors import AblateError
    with pytest.raises(AblateError, match="ABLATE_PEAK_TFLOPS: 'fast'"):
        train_cell(_cfg(epochs=1), device=CPU, checkpoint_dir=tmp_path / "c", log=lambda m: None)


def test_a_cell_that_fails_mid_epoch_leaves_no_data_thread_running(tmp_path):
    """The loaders' prefetch thread ends with the epoch, also when the cell fails in the middle of
    one: a daemon thread still inside a torch op at interpreter exit aborts the process (exit 134)
    after the grid has printed its summary."""
    import threading
    # batch 16: 89 steps an epoch, the loss is first read at step 50, in the middle of the epoch
    with pytest.raises(CellFailed, match="non-finite loss at epoch 1, between steps 1 and 50"):
        train_cell(_cfg(lr=1e30, warmup_epochs=0, mixup=0.0, batch_size=16), device=CPU, checkpoint_dir=tmp_path,
                   log=lambda m: None)
    assert not [t for t in threading.enumerate() if t.name == "ablate-data-prefetch"]


def test_the_prefetch_thread_is_joined_when_its_consumer_stops():
    import threading
    import time

    from ablate.data.array_loader import background

    def slow():
        for i in range(100):
            time.sleep(0.01)
            yield i
    items = background(slow(), depth=2)
    assert next(items) == 0
    items.close()
    assert not [t for t in threading.enumerate() if t.name == "ablate-data-prefetch"]


def test_divergence_in_the_last_step_fails_the_cell(tmp_path):
    """One step an epoch (batch 1024 of 1,437 images) at an absurd learning rate: the loss of that
    step is finite, the step turns the weights into inf/NaN, and the cell used to end COMPLETE at
    chance top-1 with val_loss nan."""
    with pytest.raises(CellFailed, match=r"diverged: non-finite (validation loss|weights) after epoch 1"):
        train_cell(_cfg(epochs=1, batch_size=1024, lr=1e30, warmup_epochs=0, mixup=0.0), device=CPU,
                   checkpoint_dir=tmp_path, log=lambda m: None)

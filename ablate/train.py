"""Train and evaluate one cell, top to bottom.

The recipe is DeiT's as the S²-MLP paper uses it (docs/paper.md, "Training recipe"): AdamW,
linear warm-up then cosine decay per step, label smoothing, DropPath, Mixup/CutMix when set.
bf16 autocast on CUDA, fp32 on CPU (recorded as ``ablate.precision``); optionally torch.compile
(inductor), on CUDA or CPU.

A checkpoint is written after every epoch (:mod:`ablate.checkpoint`: verified, tensors and plain
data only); an interrupted cell resumes from it and, because every epoch's randomness is derived
from (seed, epoch) alone, ends with the result it would have had uninterrupted: no random
generator state needs saving. Failures (non-finite loss, out of memory, anything else) raise
:class:`CellFailed` with a reason for the runner to record.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ablate import checkpoint, names
from ablate.config import CellConfig


class CellFailed(Exception):
    """This cell cannot finish; the message is the reason recorded in the ledger and MLflow."""


@dataclass
class EpochStats:
    epoch: int  # 1-based, the number of epochs completed
    train_loss: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float
    images_per_second: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The randomness of an epoch depends on the cell's seed and the epoch only (exact resume)."""
    return seed * 100_003 + epoch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def precision(device: torch.device, amp: str) -> str:
    """What a training step computes in: ``train.amp`` on CUDA, fp32 on a CPU.

    CPU autocast exists, but on a CPU it would change the numbers of every existing CPU run
    and is slower than fp32 wherever the CPU lacks bf16 units; the bf16 path itself is
    exercised on CPU by the tests. The run records what it used (``ablate.precision``).
    """
    return amp if device.type == "cuda" and amp != "off" else "fp32"


def _autocast(device: torch.device, amp: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(device, amp))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def determinism_settings() -> dict[str, object]:
    """What a run's numbers depend on besides its key and device: the same cell on the same
    device gives identical results only with the same CPU thread count (reductions split by
    thread) and the same deterministic-algorithm settings."""
    return {names.THREADS: torch.get_num_threads(),
            names.DETERMINISTIC: torch.are_deterministic_algorithms_enabled(),
            names.CUDNN_DETERMINISTIC: torch.backends.cudnn.deterministic,
            names.CUDNN_BENCHMARK: torch.backends.cudnn.benchmark}


@torch.no_grad()
def evaluate(model, loader, device, amp: str) -> tuple[float, float, float]:
    """Mean cross-entropy, top-1 and top-5 (percent) over the validation split."""
    model.eval()
    loss_sum, correct1, correct5, n = 0.0, 0, 0, 0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += targets.numel()
    n = max(n, 1)
    return loss_sum / n, 100.0 * correct1 / n, 100.0 * correct5 / n


def train_cell(cfg: CellConfig, *, device: torch.device, checkpoint_dir: Path,
               on_epoch: Optional[Callable[[EpochStats], None]] = None,
               on_start: Optional[Callable[[dict], None]] = None,
               log: Callable[[str], None] = print, progress: Optional[bool] = None) -> dict[str, float]:
    """Train ``cfg`` to the end (resuming from ``checkpoint_dir/last.pt`` if present).

    ``on_start`` receives what was set up (which data path ran, split sizes, device) before the
    first step; ``on_epoch`` is called after each epoch's evaluation (MLflow logging, Optuna
    pruning: an exception it raises, such as ``optuna.TrialPruned``, stops training and
    propagates). Returns the final metrics.
    """
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from tqdm import tqdm

    from ablate.data import build_loaders
    from ablate.models import build_model
    from ablate.models.cost import model_cost

    t = cfg.train
    seed_everything(t.seed)
    loaders = build_loaders(cfg, device, log=log)
    model = build_model(cfg.model, loaders.num_classes).to(device)
    cost = model_cost(cfg.model, loaders.num_classes)
    optimizer = create_optimizer_v2(model, opt=t.optimizer, lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = max(1, loaders.n_train // t.batch_size)
    warmup_steps = int(round(t.warmup_epochs * steps_per_epoch))
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, t.epochs * steps_per_epoch - warmup_steps),
                                  lr_min=t.min_lr, warmup_t=warmup_steps, warmup_lr_init=t.warmup_lr,
                                  warmup_prefix=True, t_in_epochs=False)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and t.amp == "fp16")
    mixup = None
    if t.mixup > 0 or t.cutmix > 0:
        mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing,
                      num_classes=loaders.num_classes)
    criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    forward = torch.compile(model) if t.compile else model
    log(f"data: {cfg.data.name} via the {loaders.kind} loader ({loaders.n_train} train / {loaders.n_val} val "
        f"images); model: {cost.params / 1e6:.3g}M params, {cost.macs / 1e9:.3g} GMACs per image")
    used = precision(device, t.amp)
    if used != t.amp and t.amp != "off":
        log(f"precision: {used} (train.amp {t.amp} applies on CUDA only)")
    if on_start is not None:
        on_start({names.DATA_LOADER: loaders.kind, names.N_TRAIN: loaders.n_train,
                  names.N_VAL: loaders.n_val, names.DEVICE: str(device), names.PRECISION: used,
                  **determinism_settings()})

    # resume
    ckpt_path = checkpoint_dir / "last.pt"
    start_epoch, history, elapsed, train_images, train_time = 0, [], 0.0, 0, 0.0
    state = checkpoint.load(ckpt_path, map_location=device, log=log)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, history = state["epoch"], state["history"]
            elapsed, train_images, train_time = state["elapsed"], state["train_images"], state["train_time"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            # intact and inert, yet not this cell's: the model may now hold part of it, so start over
            checkpoint.set_aside(ckpt_path, f"does not fit this cell ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})", log)
            return train_cell(cfg, device=device, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch,
                              on_start=on_start, log=log, progress=progress)
        log(f"resuming from {ckpt_path} after epoch {start_epoch}/{t.epochs}")

    show_bar = sys.stderr.isatty() if progress is None else progress
    for epoch in range(start_epoch, t.epochs):
        epoch_start = time.perf_counter()
        seed_everything(epoch_seed(t.seed, epoch))
        loaders.set_epoch(epoch)
        model.train()
        loss_sum, seen, step = 0.0, 0, epoch * steps_per_epoch
        bar = tqdm(loaders.train, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}",
                   leave=False, disable=not show_bar, dynamic_ncols=True)
        for images, targets in bar:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            with _autocast(device, t.amp):
                loss = criterion(forward(images), targets)
            if not torch.isfinite(loss):
                raise CellFailed(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            scheduler.step_update(step)
            loss_sum += loss.item() * images.shape[0]
            seen += images.shape[0]
            if show_bar:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen / (time.perf_counter() - epoch_start):.0f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_train_time = time.perf_counter() - epoch_start
        val_loss, top1, top5 = evaluate(forward, loaders.val, device, t.amp)
        stats = EpochStats(epoch=epoch + 1, train_loss=loss_sum / max(seen, 1), val_loss=val_loss,
                           val_top1=top1, val_top5=top5, lr=optimizer.param_groups[0]["lr"],
                           images_per_second=seen / max(epoch_train_time, 1e-9))
        history.append(asdict(stats))
        elapsed += time.perf_counter() - epoch_start
        train_images += seen
        train_time += epoch_train_time
        log(f"epoch {epoch + 1}/{t.epochs}  loss {stats.train_loss:.4f}  val_loss {val_loss:.4f}  "
            f"top1 {top1:.2f}  top5 {top5:.2f}  lr {stats.lr:.2e}  {stats.images_per_second:.0f} img/s")
        # report before saving: a kill in between re-trains this epoch (and reports it again, with
        # the same values) rather than leaving it unreported
        if on_epoch is not None:
            on_epoch(stats)
        checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch + 1, "history": history, "elapsed": elapsed,
                         "train_images": train_images, "train_time": train_time}, ckpt_path)

    last = history[-1]
    return {"val_top1": last["val_top1"], "val_top5": last["val_top5"], "val_loss": last["val_loss"],
            "train_loss": last["train_loss"], "params": cost.params, "params_paper": cost.params_paper,
            "macs": cost.macs, "flops": cost.flops, "train_seconds": elapsed,
            "images_per_second": train_images / max(train_time, 1e-9),
            "skipped_images": loaders.skipped(), "epochs": len(history)}


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def describe_failure(e: BaseException) -> str:
    if isinstance(e, CellFailed):
        return str(e)
    if is_out_of_memory(e):
        return f"out of memory: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return f"{type(e).__name__}: {e}"

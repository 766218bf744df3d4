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

import math
import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ablate import checkpoint, names
from ablate.batching import BatchSplit, mixup_once_per_step
from ablate.cell_group import CellGroup, group_broken, is_group_failure
from ablate.config import CellConfig
from ablate.data.seeding import derive_seed, global_rngs_untouched
from ablate.devices import peak_flops
from ablate.memory import SAFETY, MicroBatchMemory, probe_micro_batch, state_bytes
from ablate.models.zoo import model_cost


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
    data_wait_share: float  # of the epoch's training time, the host waited for the next batch
    tflops: float           # achieved model TFLOP/s: 6 x MACs per training image (forward + backward)
    peak_memory_gb: float   # the most device memory allocated (CUDA), or the process's peak RSS (CPU)
    mfu: Optional[float] = None  # tflops / the device's dense peak, where the peak is known
    # the fixed training subset evaluated like the validation split (train.eval_train_images; None when 0)
    train_top1: Optional[float] = None
    train_loss_eval: Optional[float] = None

    def metrics(self) -> dict[str, float]:
        """The epoch's MLflow metrics (without ``epoch``, the step they are logged at)."""
        return {k: v for k, v in asdict(self).items() if k != "epoch" and v is not None}


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
def evaluate(model, loader, device, amp: str, group: CellGroup = CellGroup()) -> tuple[float, float, float]:
    """Mean cross-entropy, top-1 and top-5 (percent) over the validation split.

    Each rank evaluates its own share of the images (the loader's); the sums are added over the
    ranks, so every image counts exactly once. The sums stay on the device until the end.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                             torch.tensor(targets.numel(), dtype=torch.float64, device=device)])
    loss_sum, correct1, correct5, n = group.sum(sums).tolist()
    n = max(n, 1)
    return loss_sum / n, 100.0 * correct1 / n, 100.0 * correct5 / n


def evaluate_train_subset(model, loaders, device, amp: str, group: CellGroup = CellGroup()
                          ) -> tuple[Optional[float], Optional[float]]:
    """Mean cross-entropy and top-1 (percent) on the fixed subset of the training split
    (``loaders.train_eval``), evaluated as :func:`evaluate` evaluates validation; ``(None, None)``
    when measuring is off.

    It changes nothing training does next: the global random generators are as they were, the
    loaders' epochs are untouched, and the model is left in eval mode, as validation leaves it
    (each epoch sets train mode at its start).
    """
    if loaders.train_eval is None:
        return None, None
    with global_rngs_untouched(device):
        loss, top1, _ = evaluate(model, loaders.train_eval, device, amp, group)
    return loss, top1


#: optimizer steps between two reads of the loss on the host (the progress bar, the non-finite check)
LOG_EVERY = 50


def _pass(forward, criterion, images, targets, device, amp: str, scale: float, scaler) -> torch.Tensor:
    """One forward and backward pass over a micro-batch; returns its (unscaled) mean loss, on the device."""
    with _autocast(device, amp):
        loss = criterion(forward(images), targets)
    scaler.scale(loss * scale).backward()
    return loss.detach()


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process held on ``device`` since the last reset (CUDA: allocated by
    tensors; CPU: the process's peak resident set, which never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _weights_finite(model) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def train_cell(cfg: CellConfig, *, device: torch.device, checkpoint_dir: Path,
               on_epoch: Optional[Callable[[EpochStats], None]] = None,
               on_start: Optional[Callable[[dict], None]] = None,
               before_write: Optional[Callable[[], None]] = None,
               group: CellGroup = CellGroup(), micro_batch: Optional[int] = None,
               log: Callable[[str], None] = print, progress: Optional[bool] = None) -> dict[str, float]:
    """Train ``cfg`` to the end (resuming from ``checkpoint_dir/last.pt`` if present).

    ``on_start`` receives what was set up (which data path ran, split sizes, device, the batch
    split) before the first step; ``before_write`` is called before every write (the epoch's
    report, the checkpoint) and may raise to stop; ``on_epoch`` is called after each epoch's
    evaluation (MLflow logging, Optuna pruning: an exception it raises, such as
    ``optuna.TrialPruned``, stops training and propagates). In a group of several processes
    every rank calls this with the same ``cfg``; only the leader reports and writes (the
    callbacks are the leader's). ``micro_batch`` overrides ``train.micro_batch`` (after an
    out-of-memory error). Returns the final metrics.
    """
    # timm, the loaders and the model take 1.8 s to import: the runner's parent imports this module and never trains
    from timm.data import Mixup  # lazy: timm (see above)
    from timm.loss import SoftTargetCrossEntropy  # lazy: timm (see above)
    from timm.optim import create_optimizer_v2  # lazy: timm (see above)
    from timm.scheduler import CosineLRScheduler  # lazy: timm (see above)

    from ablate.data.loaders import build_loaders  # lazy: torchvision and timm (see above)
    from ablate.models.zoo import build_model  # lazy: timm (see above)

    t = cfg.train
    seed_everything(t.seed)
    loaders = build_loaders(cfg, device, log=log, processes=group.size, rank=group.rank)
    model = build_model(cfg.model, loaders.num_classes).to(device)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    cost = model_cost(cfg.model, loaders.num_classes)
    train_flops = 6 * cost.macs  # per training image: forward (2 x MACs) and backward (4 x MACs)
    memory = MicroBatchMemory()
    memory_key = MicroBatchMemory.key(cfg, device_name(device))
    micro = micro_batch or resolve_micro_batch(cfg, model, device, group, memory, memory_key, log)
    split = BatchSplit(t.batch_size, micro, group.size, group.rank)
    loaders.set_split(split)
    net = model
    if group.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = create_optimizer_v2(model, opt=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                                    **({"fused": True} if device.type == "cuda" and t.optimizer == "adamw" else {}))
    steps_per_epoch = loaders.n_train // t.batch_size
    if steps_per_epoch < 1:
        raise CellFailed(f"train.batch_size {t.batch_size} is larger than the {loaders.n_train} training images: "
                         "an epoch would train nothing")
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
    forward = torch.compile(net) if t.compile else net
    log(f"data: {cfg.data.name} via the {loaders.kind} loader ({loaders.n_train} train / {loaders.n_val} val "
        f"images); model: {cost.params / 1e6:.3g}M params, {cost.macs / 1e9:.3g} GMACs per image")
    if split.accum > 1 or group.distributed or t.grad_checkpointing:
        log(f"batch: {t.batch_size} per step = {group.size} process(es) x {split.accum} pass(es) x {micro} images"
            + (", activation checkpointing" if t.grad_checkpointing else ""))
    used = precision(device, t.amp)
    peak = peak_flops(device_name(device), used)
    if used != t.amp and t.amp != "off":
        log(f"precision: {used} (train.amp {t.amp} applies on CUDA only)")
    if on_start is not None and group.leader:
        on_start({names.DATA_LOADER: loaders.kind, names.N_TRAIN: loaders.n_train,
                  names.N_VAL: loaders.n_val, names.N_TRAIN_EVAL: loaders.n_train_eval,
                  names.DEVICE: str(device), names.PRECISION: used,
                  names.COST_SOURCE: "counted" if cost.counted else "analytic",
                  names.DEVICE_NAME: device_name(device),
                  names.MICRO_BATCH: micro, names.PROCESSES: group.size, names.ACCUM_STEPS: split.accum,
                  **determinism_settings()})

    # resume
    ckpt_path = checkpoint_dir / "last.pt"
    start_epoch, history, elapsed, train_images, train_time = 0, [], 0.0, 0, 0.0
    state = checkpoint.load(ckpt_path, map_location=device, log=log if group.leader else (lambda m: None))
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
                              on_start=on_start, before_write=before_write, group=group, micro_batch=micro,
                              log=log, progress=progress)
        log(f"resuming from {ckpt_path} after epoch {start_epoch}/{t.epochs}")

    show_bar = group.leader and (sys.stderr.isatty() if progress is None else progress)
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, t.epochs):
        epoch_start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seed_everything(epoch_seed(t.seed, epoch))
        if group.rank:  # DropPath's draws: independent across ranks (rank 0 draws as a single process)
            torch.manual_seed(derive_seed(epoch_seed(t.seed, epoch), group.rank))
        loaders.set_epoch(epoch)
        net.train()
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x images, images
        bad = torch.zeros((), dtype=torch.bool, device=device)
        checked = step
        bar = tqdm(loaders.train, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}",
                   leave=False, disable=not show_bar, dynamic_ncols=True)
        waited, batches = 0.0, iter(bar)
        try:
            while True:
                asked = time.perf_counter()
                item = next(batches, None)
                waited += time.perf_counter() - asked
                if item is None:
                    break
                images, targets = item[0].to(device, non_blocking=True), item[1].to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                passes = list(split.micro_batches(images, targets))
                with mixup_once_per_step() as mix:
                    for k, (x, y) in enumerate(passes):
                        if mixup is not None:
                            x, y = mix(mixup, x, y)
                        # DDP reduces the gradients once per step, after the last pass
                        sync = net.no_sync() if group.distributed and k < len(passes) - 1 else nullcontext()
                        with sync:
                            loss = _pass(forward, criterion, x, y, device, t.amp, x.shape[0] / images.shape[0], scaler)
                        sums += torch.stack([loss.double() * x.shape[0], torch.tensor(float(x.shape[0]),
                                             dtype=torch.float64, device=device)])
                        bad |= ~torch.isfinite(loss)
                if t.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                scheduler.step_update(step)
                if step % LOG_EVERY == 0:
                    checked = _check_finite(bad, group, checked, step, epoch)
                    if show_bar:
                        done = sums.tolist()
                        bar.set_postfix(loss=f"{done[0] / max(done[1], 1):.3f}",
                                        img_s=f"{done[1] * group.size / (time.perf_counter() - epoch_start):.0f}")
        except RuntimeError as e:
            if group.distributed and is_group_failure(e):
                raise group_broken(e) from e  # another rank is gone: the attempt ends, the cell resumes
            if not isinstance(e, torch.OutOfMemoryError) or group.distributed or t.micro_batch != "auto" or micro == 1:
                raise
            memory.put(memory_key, micro // 2)
            where = f"from the last checkpoint (epoch {epoch})" if epoch else "from the start"
            log(f"out of memory at micro-batch {micro} ({str(e).splitlines()[0][:120]}); continuing with "
                f"micro-batch {micro // 2} {where}")
            del optimizer, net, forward, model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return train_cell(cfg, device=device, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch,
                              on_start=on_start, before_write=before_write, group=group, micro_batch=micro // 2,
                              log=log, progress=progress)
        finally:
            batches.close()  # the loaders' prefetch threads end now, not when the generator is collected
        _check_finite(bad, group, checked, step, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_train_time = time.perf_counter() - epoch_start
        loss_sum, seen = group.sum(sums).tolist()
        seen = int(seen)
        val_loss, top1, top5 = evaluate(forward, loaders.val, device, t.amp, group)
        if not math.isfinite(val_loss) or not _weights_finite(model):
            raise CellFailed(f"diverged: non-finite {'weights' if math.isfinite(val_loss) else 'validation loss'} "
                             f"after epoch {epoch + 1} (step {step})")
        peak_gb = peak_memory_gb(device)  # of training and validation, as before the training subset was measured
        train_loss_eval, train_top1 = evaluate_train_subset(forward, loaders, device, t.amp, group)
        rate = seen / max(epoch_train_time, 1e-9)
        stats = EpochStats(epoch=epoch + 1, train_loss=loss_sum / max(seen, 1), val_loss=val_loss,
                           val_top1=top1, val_top5=top5, lr=optimizer.param_groups[0]["lr"],
                           images_per_second=rate, data_wait_share=waited / max(epoch_train_time, 1e-9),
                           tflops=rate * train_flops / 1e12, peak_memory_gb=peak_gb,
                           mfu=rate * train_flops / (peak * group.size) if peak else None,
                           train_top1=train_top1, train_loss_eval=train_loss_eval)
        history.append(asdict(stats))
        elapsed += time.perf_counter() - epoch_start
        train_images += seen
        train_time += epoch_train_time
        if group.leader:
            log(f"epoch {epoch + 1}/{t.epochs}  loss {stats.train_loss:.4f}  val_loss {val_loss:.4f}  "
                f"top1 {top1:.2f}  top5 {top5:.2f}  "
                + (f"train_top1 {train_top1:.2f}  " if train_top1 is not None else "")
                + f"lr {stats.lr:.2e}  {stats.images_per_second:.0f} img/s")
        # report before saving: a kill in between re-trains this epoch (and reports it again, with
        # the same values) rather than leaving it unreported. Only the leader writes; the others
        # learn whether it goes on.
        stopped = None
        if group.leader:
            try:
                if before_write is not None:
                    before_write()
                if on_epoch is not None:
                    on_epoch(stats)
                if before_write is not None:
                    before_write()
                checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                 "epoch": epoch + 1, "history": history, "elapsed": elapsed,
                                 "train_images": train_images, "train_time": train_time}, ckpt_path)
            except BaseException as e:  # noqa: BLE001 - re-raised below, once the other ranks know
                stopped = e
        group.leader_says(stopped is None, f"{type(stopped).__name__}: {stopped}" if stopped else "")
        if stopped is not None:
            raise stopped

    last = history[-1]
    rate = train_images / max(train_time, 1e-9)
    run_cost = {"tflops": rate * train_flops / 1e12,
                # device-hours: every process of the cell holds its device for the whole wall time
                "gpu_hours": group.size * elapsed / 3600,
                "peak_memory_gb": max(h.get("peak_memory_gb", 0.0) for h in history),
                "data_wait_share": sum(h.get("data_wait_share", 0.0) for h in history) / len(history)}
    if peak:
        run_cost["mfu"] = rate * train_flops / (peak * group.size)
    return {"val_top1": last["val_top1"], "val_top5": last["val_top5"], "val_loss": last["val_loss"],
            "train_loss": last["train_loss"], "params": cost.params, "params_paper": cost.params_paper,
            "macs": cost.macs, "flops": cost.flops, "train_seconds": elapsed, "images_per_second": rate,
            "skipped_images": loaders.skipped(), "epochs": len(history), **run_cost, **overfitting(last)}


def overfitting(last: dict) -> dict[str, float]:
    """The last epoch's top-1 and loss on the training subset and the train - val gap in top-1
    (percentage points); nothing where the subset was not measured (eval_train_images 0, or a
    checkpoint's epoch from before it was)."""
    if last.get(names.TRAIN_TOP1) is None:
        return {}
    return {names.TRAIN_TOP1: last[names.TRAIN_TOP1], names.TRAIN_LOSS_EVAL: last[names.TRAIN_LOSS_EVAL],
            names.GAP_TOP1: last[names.TRAIN_TOP1] - last["val_top1"]}


def _check_finite(bad: torch.Tensor, group: CellGroup, checked: int, step: int, epoch: int) -> int:
    """Fail the cell if a loss since step ``checked`` was not finite (one read; all ranks agree)."""
    if step > checked and group.sum(bad.to(torch.float64)).item():
        raise CellFailed(f"non-finite loss at epoch {epoch + 1}, between steps {checked + 1} and {step}")
    return step


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve_micro_batch(cfg: CellConfig, model, device: torch.device, group: CellGroup,
                        memory: MicroBatchMemory, key: str, log: Callable[[str], None]) -> int:
    """``train.micro_batch``, or for ``auto``: the remembered value for this configuration and
    device, else (CUDA) a probe, else the rank's whole batch; the smallest over the ranks."""
    t = cfg.train
    per_rank = t.batch_size // group.size
    if t.micro_batch != "auto":
        return t.micro_batch
    micro = memory.get(key)
    if micro is not None and per_rank % micro == 0 and micro <= per_rank:
        log(f"memory: micro-batch {micro} (remembered for this configuration on {device_name(device)})")
    elif device.type == "cuda":
        micro = _probe(cfg, model, device, per_rank, log)
        memory.put(key, micro)
    else:
        micro = per_rank
    return group.min(micro)


def _probe(cfg: CellConfig, model, device: torch.device, per_rank: int, log: Callable[[str], None]) -> int:
    total = torch.cuda.get_device_properties(device).total_memory
    fixed = state_bytes(sum(p.numel() for p in model.parameters()))
    shape = (cfg.model.in_chans, cfg.model.image_size, cfg.model.image_size)

    def try_step(micro: int) -> None:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        x = torch.randn((micro, *shape), device=device)
        with _autocast(device, cfg.train.amp):
            model(x).float().sum().backward()
        model.zero_grad(set_to_none=True)

    def fits() -> bool:
        return torch.cuda.max_memory_allocated(device) + fixed <= SAFETY * total

    micro = probe_micro_batch(try_step, per_rank, is_oom=is_out_of_memory, fits=fits, log=log)
    log(f"memory: micro-batch {micro} fits {device_name(device)} ({total / 2**30:.0f} GiB)")
    torch.cuda.empty_cache()
    return micro


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def describe_failure(e: BaseException) -> str:
    if isinstance(e, CellFailed):
        return str(e)
    if is_out_of_memory(e):
        return f"out of memory: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return f"{type(e).__name__}: {e}"

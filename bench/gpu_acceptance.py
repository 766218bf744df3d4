"""The GPU acceptance run: everything a paper-scale ablation needs from one CUDA device, in one run.

Before spending GPU-hours on the paper's tables, run this once on the GPU that will train them:

    python bench/gpu_acceptance.py                   # one CUDA device, about 10 minutes
    python bench/gpu_acceptance.py --smoke --device cpu   # the same code paths, tiny, on a CPU

It prints ``name: value`` lines, in four parts, each against its target:

1. **model**: S²-MLP-wide's training step (forward, backward, AdamW) in bf16 autocast on a fixed
   batch, eager and under ``torch.compile``: images/s, achieved TFLOP/s (3 x forward FLOPs per
   image: the backward pass costs two forwards) and MFU against the device's dense bf16 peak
   (from a table of known devices, or ``--peak-tflops``). Target: MFU >= 45% compiled.
2. **data**: the uint8 cache loader at 224 px with the full DeiT recipe of the paper specs,
   augmenting on the device: images/s over whole passes. Target: >= 20,000 images/s.
3. **step with data**: the compiled bf16 step fed by that loader: the share of the step time
   spent waiting for data, measured twice: host time blocked in the loader, and the slowdown
   against the same step on a fixed batch. Target: < 5%.
4. **trainer**: ``train_cell`` itself, the loop users run (Mixup/CutMix, scheduler, checks,
   evaluation), on that loader for a few epochs: images/s, MFU and its own data-wait share, and
   the ratio trainer / ideal step (parts 1 and 3 time an idealised step). Target: >= 0.95. With
   several visible GPUs, the same cell on all of them (``train_cell`` in a process group, one
   rank per GPU): the scaling efficiency, images/s on N GPUs / (N x on one).
5. **rehearsal**: Table 7's spec (11 shift patterns) for one epoch, at full size, through
   ``ablate run`` as a user types it, on a generated ImageNet-shaped tree (``ablate data
   fake-imagenet`` -> ``ablate data imagenet100`` -> ``ablate data cache``): every cell must
   finish with no skipped image.

The images are generated (``ablate.data.fake_imagenet``): their content is noise with a class
colour, so images/s and MFU are real measurements and top-1 is not.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TABLE7 = ROOT / "experiments" / "paper" / "shift-patterns.yaml"

TARGETS = {"mfu_compiled": 0.45, "data_images_per_second": 20_000, "data_wait_share": 0.05,
           "trainer_over_ideal": 0.95}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N (or cpu with --smoke)")
    p.add_argument("--batch", type=int, default=256, help="images per training step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--train-per-class", type=int, default=40,
                   help="generated training images per ImageNet100 class (4,000 at the default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: table)")
    p.add_argument("--workdir", default=None, help="where to generate data and run (default: a temp dir)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    p.add_argument("--skip-rehearsal", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, data and rehearsal: checks the code paths (on a CPU too), measures nothing")
    return p.parse_args()


def say(name: str, value) -> None:
    print(f"{name}: {value}", flush=True)


SMOKE = False  # set by --smoke: the figures are not measurements, so no verdict is given


def verdict(name: str, value: float, target: float, higher_is_better: bool = True) -> None:
    ok = value >= target if higher_is_better else value < target
    result = "n/a (smoke run)" if SMOKE else "PASS" if ok else "FAIL"
    say(f"{name}_target", f"{'>=' if higher_is_better else '<'} {target:g}: {result}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    from ablate.devices import peak_flops
    peak = peak_flops(torch.cuda.get_device_name(device), "bf16")
    return peak / 1e12 if peak else None


# ---- the recipe of the paper specs, shrunk only where --smoke says -------------------------------

def paper_config(root: Path | None, smoke: bool, batch: int, compile_model: bool):
    """Table 7's base cell (S²-MLP-wide, DeiT recipe) as the spec loader resolves it."""
    from ablate.spec import load_spec

    overrides = [f"train.batch_size={batch}", f"train.compile={str(compile_model).lower()}", "train.amp=bf16"]
    if smoke:
        overrides += ["model.width=64", "model.depth=2"]
    env = os.environ.get("IMAGENET100_ROOT")
    os.environ["IMAGENET100_ROOT"] = str(root) if root else env or "/nonexistent"
    try:
        spec = load_spec(TABLE7, overrides=overrides, check_paths=root is not None)
    finally:
        if env is None:
            del os.environ["IMAGENET100_ROOT"]
        else:
            os.environ["IMAGENET100_ROOT"] = env
    return spec.cells()[0].config


# ---- 1. model ------------------------------------------------------------------------------------

class Step:
    """One bf16 training step of ``model`` (AdamW, DeiT's loss with soft targets off: the data
    recipe's cost is measured separately)."""

    def __init__(self, model, device: torch.device, compile_model: bool):
        self.model = torch.compile(model) if compile_model else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def __call__(self, images, targets):
        with self.autocast:
            loss = F.cross_entropy(self.model(images), targets)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def time_steps(step, batches, device, steps: int) -> tuple[float, float]:
    """(seconds per step, share of it spent blocked in ``next(batches)``), after 3 warm-up steps."""
    for _ in range(3):
        step(*next(batches))
    sync(device)
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        images, targets = next(batches)
        waited += time.perf_counter() - t
        step(images, targets)
    sync(device)
    total = time.perf_counter() - start
    return total / steps, waited / total


def fixed_batches(batch: int, size: int, classes: int, device):
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, classes, (batch,), device=device)
    while True:
        yield images, targets


def measure_model(cfg, args, device, peak) -> dict[str, float]:
    from ablate.models import model_cost
    from ablate.models.s2mlp import build_model

    flops_per_image = 3 * model_cost(cfg.model, 100).flops  # forward + backward (two forwards)
    say("model", f"S2-MLP width {cfg.model.width}, depth {cfg.model.depth}, patch {cfg.model.patch_size}, "
        f"{cfg.model.image_size} px, {flops_per_image / 3e9:.2f} GFLOPs forward per image")
    out = {}
    for compiled in ([False] if args.no_compile else [False, True]):
        name = "compiled" if compiled else "eager"
        torch.manual_seed(0)
        model = build_model(cfg.model, 100).to(device)
        step = Step(model, device, compiled)
        seconds, _ = time_steps(step, fixed_batches(args.batch, cfg.model.image_size, 100, device), device,
                                args.steps)
        rate = args.batch / seconds
        tflops = rate * flops_per_image / 1e12
        say(f"step_{name}_images_per_second", f"{rate:.0f}")
        say(f"step_{name}_tflops", f"{tflops:.1f}")
        if peak:
            out[f"mfu_{name}"] = tflops / peak
            say(f"mfu_{name}", f"{tflops / peak:.1%}")
        out[f"seconds_{name}"] = seconds
        del model, step
    if peak and "mfu_compiled" in out:
        verdict("mfu_compiled", out["mfu_compiled"], TARGETS["mfu_compiled"])
    return out


# ---- 2./3. data ----------------------------------------------------------------------------------

def prepare_data(workdir: Path, train_per_class: int, image_size: int) -> Path:
    """Generated ImageNet-1K tree -> ImageNet100 links -> uint8 cache, as a user would."""
    fake, in100 = workdir / "fake-imagenet", workdir / "imagenet100"
    start = time.perf_counter()
    ablate("data", "fake-imagenet", "--out", str(fake), "--train-per-class", str(train_per_class),
           "--val-per-class", "2", cwd=workdir)
    ablate("data", "imagenet100", "--imagenet", str(fake), "--out", str(in100), "--force", cwd=workdir)
    ablate("data", "cache", str(in100), "--size", str(image_size * 8 // 7), cwd=workdir)
    say("data_prepare_seconds", f"{time.perf_counter() - start:.0f}")
    return in100


def loader_batches(loaders):
    epoch = 0
    while True:
        loaders.set_epoch(epoch)
        yield from loaders.train
        epoch += 1


def measure_data(cfg, args, device) -> float:
    from ablate.data.loaders import build_loaders

    loaders = build_loaders(cfg, device, log=lambda m: None)
    say("data_loader", f"{loaders.kind} ({loaders.n_train} train images, randaugment {cfg.train.randaugment}, "
        f"random erasing {cfg.train.random_erasing}, mixup/cutmix in the step)")
    rates = []
    for epoch in range(3):  # the first pass warms up (page cache, kernels)
        loaders.set_epoch(epoch)
        sync(device)
        n, start = 0, time.perf_counter()
        for images, _ in loaders.train:
            n += len(images)
        sync(device)
        if epoch:
            rates.append(n / (time.perf_counter() - start))
    rate = statistics.median(rates)
    say("data_images_per_second", f"{rate:.0f}")
    verdict("data_images_per_second", rate, TARGETS["data_images_per_second"])
    return rate


def measure_step_with_data(cfg, args, device, fixed_seconds: float) -> None:
    from ablate.data.loaders import build_loaders
    from ablate.models.s2mlp import build_model

    loaders = build_loaders(cfg, device, log=lambda m: None)
    torch.manual_seed(0)
    step = Step(build_model(cfg.model, loaders.num_classes).to(device), device, not args.no_compile)
    seconds, blocked = time_steps(step, loader_batches(loaders), device, args.steps)
    slowdown = max(0.0, 1 - fixed_seconds / seconds)
    say("step_with_data_images_per_second", f"{args.batch / seconds:.0f}")
    say("data_wait_share_blocked", f"{blocked:.1%}")
    say("data_wait_share_slowdown", f"{slowdown:.1%}")
    verdict("data_wait_share", max(blocked, slowdown), TARGETS["data_wait_share"], higher_is_better=False)


# ---- 4. the trainer ----------------------------------------------------------------------------

def _trainer_rate(cfg, device: torch.device, workdir: Path, rank: int = 0, size: int = 1, address: str = "",
                  out: list | None = None) -> tuple[float, float]:
    """(images/s, data-wait share) of ``train_cell`` on ``cfg``: the median over its epochs after the first."""
    from ablate.cell_group import CellGroup
    from ablate.train import train_cell

    group = CellGroup.join(rank, size, address, device) if size > 1 else CellGroup()
    epochs = []
    try:
        train_cell(cfg, device=device, checkpoint_dir=workdir / f"trainer-{size}", group=group,
                   on_epoch=epochs.append, log=lambda m: None, progress=False)
    finally:
        group.leave()
    later = epochs[1:] or epochs
    rate = statistics.median(e.images_per_second for e in later)
    wait = statistics.median(e.data_wait_share for e in later)
    if out is not None:
        out.extend([rate, wait])
    return rate, wait


def _rank(rank: int, size: int, address: str, cfg_json: str, workdir: str, results) -> None:
    from ablate.config import CellConfig
    device = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(device)
    rate, _ = _trainer_rate(CellConfig.model_validate_json(cfg_json), device, Path(workdir), rank, size, address)
    if rank == 0:
        results.put(rate)


def measure_trainer(cfg, args, device, peak, ideal_seconds: float, workdir: Path) -> None:
    from ablate.models import model_cost

    flops_per_image = 3 * model_cost(cfg.model, 100).flops
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2 if args.smoke else 4})})
    rate, wait = _trainer_rate(cfg, device, workdir)
    ideal = args.batch / ideal_seconds
    say("trainer_images_per_second", f"{rate:.0f}")
    say("trainer_tflops", f"{rate * flops_per_image / 1e12:.1f}")
    if peak:
        say("trainer_mfu", f"{rate * flops_per_image / 1e12 / peak:.1%}")
    say("trainer_data_wait_share", f"{wait:.1%}")
    say("trainer_over_ideal", f"{rate / ideal:.3f}")
    verdict("trainer_over_ideal", rate / ideal, TARGETS["trainer_over_ideal"])
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus > 1:
        import torch.multiprocessing as mp

        from ablate.cell_group import free_port
        results = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_rank, args=(gpus, f"tcp://127.0.0.1:{free_port()}", cfg.model_dump_json(), str(workdir), results),
                 nprocs=gpus, join=True)
        many = results.get()
        say(f"trainer_{gpus}_gpus_images_per_second", f"{many:.0f}")
        say("trainer_scaling_efficiency", f"{many / (gpus * rate):.1%}")


# ---- 5. rehearsal --------------------------------------------------------------------------------

def ablate(*argv: str, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "ablate", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"ablate {' '.join(argv)} failed with status {proc.returncode}:\n{proc.stdout[-3000:]}"
                 f"\n{proc.stderr[-3000:]}")
    return proc.stdout


def rehearse_table7(workdir: Path, in100: Path, args, device) -> None:
    overrides = ["--set", "train.epochs=1", "--set", f"train.batch_size={args.batch}"]
    if args.smoke:
        overrides += ["--set", "model.width=64", "--set", "model.depth=2"]
    env = {"IMAGENET100_ROOT": str(in100), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "ABLATE_STORAGE": f"sqlite:///{workdir / 'ablate-ledger.db'}",
           "ABLATE_CHECKPOINTS": str(workdir / "checkpoints")}
    start = time.perf_counter()
    ablate("run", str(TABLE7), *overrides, "--name", "gpu-acceptance-table7", "--device", str(device), cwd=workdir,
           env=env)
    wall = time.perf_counter() - start
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("gpu-acceptance-table7")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("ablate.role") == "cell"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    skipped = sum(r.data.metrics.get("skipped_images", 0) for r in finished)
    say("rehearsal_cells_finished", f"{len(finished)}/11")
    say("rehearsal_skipped_images", f"{skipped:.0f}")
    say("rehearsal_wall_seconds", f"{wall:.0f}")
    rates = [r.data.metrics["images_per_second"] for r in finished if "images_per_second" in r.data.metrics]
    if rates:
        say("rehearsal_train_images_per_second_median", f"{statistics.median(rates):.0f}")
    say("rehearsal_loaders", json.dumps(sorted({r.data.tags.get("ablate.data_loader", "?") for r in finished})))
    ok = len(finished) == 11 and skipped == 0
    say("rehearsal_target", f"11/11 finished, 0 skipped: {'PASS' if ok else 'FAIL'}")  # holds in a smoke run too


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run on the GPU machine, or add --smoke --device cpu to check the code paths")
    if args.smoke:
        global SMOKE
        SMOKE = True
        args.batch, args.steps, args.train_per_class = min(args.batch, 8), min(args.steps, 2), 1
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_tflops(device, args.peak_tflops)
    say("device", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    say("torch", torch.__version__)
    say("peak_bf16_tflops", f"{peak:g}" if peak else "unknown (pass --peak-tflops for MFU)")

    model_cfg = paper_config(None, args.smoke, args.batch, compile_model=not args.no_compile)
    timings = measure_model(model_cfg, args, device, peak)

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="ablate-gpu-acceptance-")
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    in100 = prepare_data(workdir, args.train_per_class, model_cfg.model.image_size)
    cfg = paper_config(in100, args.smoke, args.batch, compile_model=not args.no_compile)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"loader": "cache"})})
    measure_data(cfg, args, device)
    fixed = timings["seconds_eager" if args.no_compile else "seconds_compiled"]
    measure_step_with_data(cfg, args, device, fixed)
    measure_trainer(cfg, args, device, peak, fixed, workdir)
    if not args.skip_rehearsal:
        rehearse_table7(workdir, in100, args, device)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""Training-step speed of S²-MLP against timm's MLP-Mixer of the same width, depth, patch and image.

Everything is measured in the same run, interleaved (S²-MLP step, Mixer step, matmul, shift, block,
then again) so that a machine whose load changes slows all alike; each figure is the fastest of
the repeats (``--stat median`` for the median), after warm-up. Prints ``name: value`` lines:

* images/s of a full training step (forward + backward + AdamW step), per model;
* milliseconds per forward GMAC (step time / (batch x forward GMACs per image)): a cost-normalised
  speed, since the two models do different amounts of work at the same size;
* the share of one S²-MLP block's forward time spent in the spatial shift;
* this machine's fp32 matmul GFLOP/s (one large square ``torch.matmul``) and the S²-MLP training
  step's achieved GFLOP/s (3 x forward FLOPs per image, from the analytic cost) as a fraction of it.

Targets: S²-MLP ms/GMAC <= Mixer's; shift <= 3% of the block; training step >= 75% of matmul.

    python bench/model_speed.py                       # CPU fp32, about a minute on 2 cores
    python bench/model_speed.py --device cuda --amp bf16 --compile --batch 256
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from timm.models.mlp_mixer import MlpMixer
from torch.utils.flop_counter import FlopCounterMode

from ablate.config import ModelConfig
from ablate.models import model_cost
from ablate.models.s2mlp import build_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each measured function")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=["off", "bf16"], default="off", help="bf16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, which other processes on a "
                   "busy machine barely disturb (use with --threads 1: idle OpenMP threads spin)")
    p.add_argument("--stat", choices=["min", "median"], default="min",
                   help="summary of the repeats: min (the least disturbed sample, robust on a shared "
                   "machine; timeit's advice) or median")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device, clock=time.perf_counter) -> float:
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def interleaved_times(fns: dict, device, repeats: int, stat: str, clock) -> dict[str, float]:
    """Seconds of each function (median or min of the repeats), run in turn (a, b, c, a, b, c, ...)
    so that a machine whose load changes during the run slows all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn, device, clock))
    summary = statistics.median if stat == "median" else min
    return {name: summary(t) for name, t in times.items()}


def forward_macs_per_image(model: torch.nn.Module, image: int, device) -> int:
    """Counted multiply-adds of one forward pass (torch's flop counter counts 2 per multiply-add)."""
    x = torch.randn(1, 3, image, image, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


class TrainStep:
    """One optimizer step on a fixed random batch (data loading is not what is measured)."""

    def __init__(self, model, args, device):
        self.model = torch.compile(model) if args.compile else model
        # fused: one kernel for all parameters instead of ~10 small ops per tensor (same for both models)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
        self.x = torch.randn(args.batch, 3, args.image, args.image, device=device)
        self.y = torch.randint(0, args.classes, (args.batch,), device=device)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16"
                         else nullcontext())

    def __call__(self):
        with self.autocast:
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def square_matmul(size: int, device, dtype=torch.float32):
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return lambda: torch.matmul(a, b)


#: shift calls per timed sample: one call is well under a millisecond, below what one sample of a
#: busy machine's timer resolves reliably; back to back its input stays in cache, as in the block
#: where the shift reads the GELU output just written.
SHIFT_CALLS = 10


def shift_and_block(model, args, device):
    """One block's forward, and SHIFT_CALLS runs of its shift alone on what it sees in that block."""
    block = model.blocks[0]
    side = args.image // args.patch
    x = torch.randn(args.batch, side, side, args.width, device=device)
    with torch.no_grad():
        hidden = F.gelu(block.spatial_mlp.fc1(x))
    shift = block.spatial_mlp.shift

    @torch.no_grad()
    def shifts():
        for _ in range(SHIFT_CALLS):
            shift(hidden)

    @torch.no_grad()
    def block_forward():
        block(x)
    return shifts, block_forward


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    cfg = ModelConfig(width=args.width, depth=args.depth, patch_size=args.patch, image_size=args.image)
    s2mlp = build_model(cfg, args.classes).to(device)
    mixer = MlpMixer(num_classes=args.classes, img_size=args.image, patch_size=args.patch,
                     num_blocks=args.depth, embed_dim=args.width).to(device)
    s2_macs = model_cost(cfg, args.classes).macs
    assert forward_macs_per_image(s2mlp, args.image, device) == s2_macs, "analytic cost disagrees"
    mixer_macs = forward_macs_per_image(mixer, args.image, device)

    # the reference rate is measured in the precision the training step computes in
    matmul_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    s2_step, mixer_step = TrainStep(s2mlp, args, device), TrainStep(mixer, args, device)
    shift_fn, block_fn = shift_and_block(s2mlp, args, device)
    fns = {"s2mlp": s2_step, "mixer": mixer_step, "matmul": square_matmul(args.matmul_size, device, matmul_dtype),
           "shift": shift_fn, "block": block_fn}
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    load_before = os.getloadavg()[0]
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    secs = interleaved_times(fns, device, args.repeats, args.stat, clock)

    gmacs = {"s2mlp": s2_macs / 1e9, "mixer": mixer_macs / 1e9}
    ms_per_gmac = {n: 1e3 * secs[n] / (args.batch * gmacs[n]) for n in gmacs}
    peak = 2 * args.matmul_size**3 / secs["matmul"] / 1e9
    achieved = 3 * 2 * s2_macs * args.batch / secs["s2mlp"] / 1e9
    shift_s, block_s = secs["shift"] / SHIFT_CALLS, secs["block"]

    amp = f", {args.amp} autocast" if args.amp != "off" else ", fp32"
    print(f"device: {device}{amp}{', compiled' if args.compile else ''}, {torch.get_num_threads()} threads")
    print(f"config: width {args.width}, depth {args.depth}, patch {args.patch}, image {args.image}, "
          f"batch {args.batch}, {args.stat} of {args.repeats} repeats, {args.clock} clock")
    print(f"load_average_1min: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} cores; other processes slow every figure)")
    for name in gmacs:
        print(f"{name}_gmacs_per_image: {gmacs[name]:.3f}")
        print(f"{name}_train_images_per_s: {args.batch / secs[name]:.1f}")
        print(f"{name}_train_ms_per_gmac: {ms_per_gmac[name]:.3f}")
    print(f"s2mlp_over_mixer_ms_per_gmac: {ms_per_gmac['s2mlp'] / ms_per_gmac['mixer']:.3f} (target <= 1)")
    print(f"shift_ms: {1e3 * shift_s:.3f}")
    print(f"block_forward_ms: {1e3 * block_s:.3f}")
    print(f"shift_share_of_block: {100 * shift_s / block_s:.2f}% (target <= 3%)")
    unit = "GFLOP/s"
    print(f"matmul_{args.matmul_size}_{str(matmul_dtype).split('.')[-1]}_{unit}: {peak:.1f}")
    print(f"s2mlp_train_achieved_{unit}: {achieved:.1f}")
    print(f"s2mlp_train_fraction_of_matmul: {100 * achieved / peak:.1f}% (target >= 75%)")


if __name__ == "__main__":
    main()

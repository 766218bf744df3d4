"""What a device can do at its best: the dense peak FLOP/s that MFU is measured against.

Peaks are the vendors' data-sheet figures for dense (no sparsity) tensor-core math at 16-bit
precision (bf16 or fp16), matched against ``torch.cuda.get_device_name``, most specific first.
A device not in the table (any CPU, a GPU not listed, fp32 training) has no known peak unless
``ABLATE_PEAK_TFLOPS`` says it: MFU is then not recorded rather than guessed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional

from ablate.environ import positive_number

PEAK_16BIT_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4),
                     ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0),
                     ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0))


def peak_from_setting() -> Optional[float]:
    """``ABLATE_PEAK_TFLOPS`` in FLOP/s, or None when unset; a bad value is a one-line error."""
    tflops = positive_number("ABLATE_PEAK_TFLOPS", "the device's dense peak in TFLOP/s, a positive number")
    return tflops * 1e12 if tflops is not None else None


def peak_flops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak FLOP/s of ``device_name`` computing in ``precision`` (bf16, fp16, fp32); None if unknown."""
    given = peak_from_setting()
    if given is not None:
        return given
    if precision not in ("bf16", "fp16"):
        return None
    return next((peak * 1e12 for key, peak in PEAK_16BIT_TFLOPS if key in device_name), None)


def local_gpu() -> Optional[tuple[str, int]]:
    """(name, memory in bytes) of this machine's first GPU, from nvidia-smi without starting CUDA
    (the plan stays light); None without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
        name, memory = out[0].rsplit(",", 1)
        return name.strip(), int(float(memory) * 2 ** 20)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def usable_cpus() -> int:
    """CPU cores this process may run on: a Slurm job or a container may allow fewer than the
    machine has (``os.cpu_count()`` counts them all, and threads sized by it oversubscribe)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

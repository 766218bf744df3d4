"""What a cell needs in device memory, and the largest micro-batch that fits.

What autograd saves for the backward pass, not the weights, bounds the batch of an S²-MLP.
:func:`activation_bytes` counts it per image from the architecture (``ablate plan``'s memory
column); :func:`measured_activation_bytes` measures it on a real forward pass by summing the
tensors autograd saves (``torch.autograd.graph.saved_tensors_hooks``, each storage once), and the
tests hold the two together. On CUDA, ``train.micro_batch: auto`` probes the largest micro-batch
that fits (:func:`probe_micro_batch`: a forward and backward, halving on out-of-memory) and
remembers it per configuration and device (:class:`MicroBatchMemory`), so later cells skip the
probe; an out-of-memory error in the middle of a cell halves the remembered value.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Optional

#: the share of a GPU's memory a probed micro-batch may use (allocator fragmentation, workspace)
SAFETY = 0.85


def _bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def activation_bytes(model, precision: str = "bf16", *, device_type: str = "cuda",
                     grad_checkpointing: bool = False) -> int:
    """Bytes autograd keeps per image through one forward pass of ``model`` (a ModelConfig).

    Per block (M tokens, width c, hidden h = r·c), autograd saves the inputs of the four FCs
    (M·c, M·c, M·c, M·h... in the compute precision), of the two GELUs, and of the two norms
    (fp32 under CUDA autocast, which runs layer_norm in fp32), plus each LayerNorm's mean and
    rstd (M fp32 values each). With activation checkpointing a block keeps only its fp32 input,
    and one block's activations exist at a time during the backward pass.
    """
    m, c, h = model.num_patches, model.width, model.hidden
    low = _bytes(precision)
    norm = 4 if precision != "fp32" and device_type == "cuda" else low
    stats = 2 * 4 * m if model.norm == "layernorm" else 0  # one norm's mean and rstd
    # FC1, FC2, FC3 inputs and the first GELU's: M·c each; FC4's input and the second GELU's: M·h each
    block = low * (4 * m * c + 2 * m * h + _mixer_saved(model)) + 2 * (norm * m * c + stats)
    embed = low * model.in_chans * model.image_size ** 2 + norm * m * c + stats  # the image, the patch norm
    head = low * c + (norm * m * c + stats if model.norm_position == "pre" else 0)  # pooled features (+ final norm)
    if grad_checkpointing:
        return embed + model.depth * 4 * m * c + block + head
    return embed + model.depth * block + head


def _mixer_saved(model) -> int:
    """Values a block's token mixer saves per image beyond FC2's input: the token MLP its
    (transposed) input and its hidden layer twice (GELU's input, FC's input); the depthwise
    convolution its input; the shift nothing."""
    if model.token_mixing == "mlp":
        return model.num_patches * model.width + 2 * model.width * model.token_mlp_hidden
    if model.token_mixing == "dwconv":
        return model.num_patches * model.width
    return 0


def measured_activation_bytes(net, images, autocast_dtype=None) -> int:
    """Bytes autograd saves in one forward pass of ``net`` on ``images``, each storage counted once."""
    import torch  # lazy: ablate plan imports this module (the analytic count) without torch

    storages: dict[tuple[int, int], int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            net(images)
    return sum(storages.values())


def fitting_micro_batch(per_image: int, fixed: int, memory: int, per_rank: int) -> int:
    """The largest power-of-two fraction of ``per_rank`` whose activations plus ``fixed`` bytes
    (weights, gradients, optimizer state) stay within :data:`SAFETY` of ``memory``; 0 if none."""
    micro = per_rank
    while micro >= 1:
        if fixed + micro * per_image <= SAFETY * memory and per_rank % micro == 0:
            return micro
        if micro % 2:
            break
        micro //= 2
    return 0


def state_bytes(params: int) -> int:
    """fp32 weights, gradients and AdamW's two moments."""
    return 16 * params


# ---- remembered micro-batches --------------------------------------------------------------------

def _store_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ablate" / "micro-batches.json"


class MicroBatchMemory:
    """The micro-batch that fit, per (configuration, device name): a small JSON file of the user's
    (read only when this user owns it; never executed, never unpickled)."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path or _store_path()

    @staticmethod
    def key(cfg, device_name: str) -> str:
        """What the memory of a pass depends on: the model, the precision, checkpointing, compile."""
        what = {"model": cfg.model.model_dump(mode="json"), "amp": cfg.train.amp,
                "grad_checkpointing": cfg.train.grad_checkpointing, "compile": cfg.train.compile,
                "device": device_name}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def _read(self) -> dict[str, int]:
        try:
            if self.path.stat().st_uid != os.getuid():
                return {}
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, int) and v > 0} if isinstance(data, dict) else {}

    def get(self, key: str) -> Optional[int]:
        return self._read().get(key)

    def put(self, key: str, micro: int) -> None:
        data = self._read()
        data[key] = int(micro)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".micro-batches.")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache only: the next cell probes again


def probe_micro_batch(try_step: Callable[[int], None], per_rank: int, *, is_oom: Callable[[BaseException], bool],
                      fits: Callable[[], bool], log: Callable[[str], None]) -> int:
    """The largest micro-batch, halving from ``per_rank``, for which ``try_step(micro)`` (a forward
    and backward) neither runs out of memory nor leaves ``fits()`` false. Raises the last
    out-of-memory error when even 1 does not fit."""
    micro = per_rank
    while True:
        try:
            try_step(micro)
            if fits():
                return micro
            why = "over the safety margin"
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raised
            if not is_oom(e) or micro == 1:
                raise
            why = "out of memory"
        if micro % 2 or per_rank % (micro // 2):
            raise RuntimeError(f"out of memory: no micro-batch dividing {per_rank} fits (tried {micro}); "
                               "set train.grad_checkpointing: true or a smaller train.batch_size")
        log(f"memory: micro-batch {micro} does not fit ({why}); trying {micro // 2}")
        micro //= 2


# ---- the plan's memory column ----------------------------------------------------------------------

#: the memory the plan assumes when it is not told and sees no GPU: an 80 GB H100/A100
DEFAULT_GPU_MEMORY = 80 * 10 ** 9
_UNITS = {"": 10 ** 9, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text: str) -> int:
    """``80GB``, ``24G``, ``48GiB``, ``81920MiB`` or a bare number of GB, in bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} (allowed: a size such as 80GB, 24G, 48GiB or 81920MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def plan_memory(per_image: int, per_image_checkpointed: int, params: int, batch: int, processes: int,
                memory: int) -> tuple[int, int, int]:
    """(activation bytes per image, micro-batch that fits ``memory``, that with checkpointing) for
    a cell on CUDA: the plan's estimate of what ``train.micro_batch: auto`` will find."""
    per_rank = batch // processes
    fixed = state_bytes(params)
    return (per_image, fitting_micro_batch(per_image, fixed, memory, per_rank),
            fitting_micro_batch(per_image_checkpointed, fixed, memory, per_rank))

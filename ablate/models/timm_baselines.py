"""Any timm model as a baseline cell: ``model.timm: <registered name>`` with ``model.timm_args``.

The paper's ImageNet-1K table sets S²-MLP against MLP-Mixer and ResMLP (docs/paper.md, "Model
settings"); timm ships those (``mixer_b16_224``, ``resmlp_36_224``), gMLP, DeiT and many more.
A baseline cell trains on the same data with the same recipe as the S²-MLP cells beside it.

* :func:`create_kwargs`: what :func:`timm.create_model` is called with: ``timm_args``, then
  ``num_classes`` and ``in_chans`` from the data, ``img_size`` from ``model.image_size`` where
  the model takes one (a convolutional net does not), ``drop_path_rate`` from ``model.drop_path``
  where it is set. Never ``pretrained``: nothing is downloaded.
* :func:`problem`: why a name or its arguments cannot build a model, in one line (an unknown name
  with the nearest registered ones, an argument the model does not take, timm's own refusal).
* :func:`counted`: parameters, multiply-adds (``torch.utils.flop_counter``, which counts two
  FLOPs per multiply-add) and the activation bytes autograd saves per image, counted on one real
  forward pass; slow for big models (seconds), so each configuration is counted once and the
  figures kept in a small JSON file beside the remembered micro-batches
  (``~/.cache/ablate/counted-costs.json``, read only when this user owns it).

timm's variants fix their own architecture: ``mixer_b16_224`` refuses ``embed_dim`` ("got
multiple values for keyword argument"), while ``deit_base_patch16_224`` lets an argument
replace its own. :func:`problem` says which; a smaller model is another registered name.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ablate.config import ModelConfig

#: the errors timm raises for arguments a model cannot be built with (read into one line)
BUILD_ERRORS = (TypeError, ValueError, AssertionError, RuntimeError, KeyError)


@dataclass(frozen=True)
class Counted:
    """What one forward pass of a timm model counted, per image."""
    params: int
    params_head: int
    macs: int
    activation_bytes: int  # saved by autograd in fp32 (half of it in bf16/fp16 autocast, roughly)

    def to_dict(self) -> dict[str, int]:
        return {"params": self.params, "params_head": self.params_head, "macs": self.macs,
                "activation_bytes": self.activation_bytes}


def create_kwargs(model_cfg: "ModelConfig", num_classes: int, *, img_size: bool = True) -> dict[str, Any]:
    """The keyword arguments of ``timm.create_model(model_cfg.timm, ...)`` for this cell."""
    kwargs = dict(model_cfg.timm_args, num_classes=num_classes, in_chans=model_cfg.in_chans)
    if img_size:
        kwargs["img_size"] = model_cfg.image_size
    if model_cfg.drop_path > 0:
        kwargs["drop_path_rate"] = model_cfg.drop_path
    return kwargs


def create(model_cfg: "ModelConfig", num_classes: int):
    """The timm model of a baseline cell, freshly initialised (never pretrained)."""
    import timm  # lazy: the spec checks and ablate plan read this module without torch

    try:
        return timm.create_model(model_cfg.timm, pretrained=False, **create_kwargs(model_cfg, num_classes))
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        # a model without an input size (a convolutional net): it takes any image size
        return timm.create_model(model_cfg.timm, pretrained=False,
                                 **create_kwargs(model_cfg, num_classes, img_size=False))


def problem(model_cfg: "ModelConfig", num_classes: int) -> Optional[str]:
    """Why ``model.timm``/``model.timm_args`` cannot build a model, in one line; ``None`` if they can.

    Builds the model on the meta device (no memory, no initialisation cost).
    """
    import timm  # lazy: only specs with a timm cell pay for importing timm
    import torch  # lazy: as timm

    name = model_cfg.timm
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        return (f"unknown timm model {name!r}{hint} (allowed: a name `timm.list_models()` lists, "
                f"e.g. mixer_b16_224, resmlp_36_224, gmlp_s16_224, deit_base_patch16_224)")
    try:
        with torch.device("meta"):
            create(model_cfg, max(num_classes, 1))
    except BUILD_ERRORS as e:
        text = " ".join(str(e).split()) or type(e).__name__
        if "multiple values for keyword argument" in text:
            return (f"{name} fixes {text.rsplit(' ', 1)[-1]} itself (timm: {text}) (allowed: timm_args the model "
                    "leaves open, or another registered variant)")
        return f"timm cannot build {name} with timm_args {json.dumps(model_cfg.timm_args)}: {text[:300]}"
    return None


# ---- counting -----------------------------------------------------------------------------------

def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ablate" / "counted-costs.json"


def _cache_key(model_cfg: "ModelConfig", num_classes: int) -> str:
    what = {"timm": model_cfg.timm, "kwargs": create_kwargs(model_cfg, num_classes), "timm_version": version("timm"),
            "torch_version": version("torch")}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        if path.stat().st_uid != os.getuid():
            return {}  # another user's file: never trusted
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".counted-costs.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache only: the next command counts again


def cached(model_cfg: "ModelConfig", num_classes: int, cache: Optional[Path] = None) -> Optional[Counted]:
    """The counted cost kept for this configuration (and timm and torch release), if any: it was
    built and counted once, so it builds (the spec check need not import timm again)."""
    entry = _read_cache(cache or _cache_path()).get(_cache_key(model_cfg, num_classes))
    fields = set(Counted.__dataclass_fields__)
    if isinstance(entry, dict) and set(entry) == fields and all(isinstance(v, int) for v in entry.values()):
        return Counted(**entry)
    return None


def counted(model_cfg: "ModelConfig", num_classes: int, cache: Optional[Path] = None) -> Counted:
    """The counted cost of a baseline cell's model: from the cache, else one counting pass (kept)."""
    path = cache or _cache_path()
    hit = cached(model_cfg, num_classes, path)
    if hit is not None:
        return hit
    key = _cache_key(model_cfg, num_classes)
    result = count(model_cfg, num_classes)
    data = _read_cache(path)
    data[key] = result.to_dict()
    _write_cache(path, data)
    return result


def count(model_cfg: "ModelConfig", num_classes: int) -> Counted:
    """Build the model on the CPU and count one forward pass of one image, then of two: the
    multiply-adds of the first (FLOPs / 2), the activation bytes per image from the difference
    (the saved copies of the weights cancel). The caller's random state is left as it was."""
    import torch  # lazy: as timm
    from torch.utils.flop_counter import FlopCounterMode  # lazy: as torch

    from ablate.memory import measured_activation_bytes  # lazy: memory imports this module's caller

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create(model_cfg, num_classes).train()
        params = sum(p.numel() for p in model.parameters())
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        params_head = sum(p.numel() for p in head.parameters()) if isinstance(head, torch.nn.Module) else 0
        shape = (model_cfg.in_chans, model_cfg.image_size, model_cfg.image_size)
        with FlopCounterMode(display=False) as counter:
            one = measured_activation_bytes(model, torch.randn(1, *shape))
        two = measured_activation_bytes(model, torch.randn(2, *shape))
    return Counted(params=params, params_head=params_head, macs=counter.get_total_flops() // 2,
                   activation_bytes=max(two - one, 0))

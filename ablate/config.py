"""The resolved configuration of one cell (one training run): data, model and training.

Every setting has a type, a default and a one-line description (``ablate spec-help`` prints
them). The spec file format (grids, searches, ``extends``) lives in :mod:`ablate.spec`; this
module is only the schema of one fully resolved configuration and its stable key.
"""
from __future__ import annotations

import hashlib
import json
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from ablate.augment_policy import check_policy
from ablate.models.cost import model_cost
from ablate.models.shift_patterns import resolve_offsets

NUM_CLASSES = {"imagenet100": 100, "imagenet1k": 1000, "digits": 10}
#: the largest synthetic split: its images are made batch by batch, but an epoch must end
MAX_SYNTHETIC_IMAGES = 10 ** 8
#: the largest model trained: far beyond any S²-MLP (the wide one has 7.1e7 parameters and 1.4e10
#: multiply-adds per image); a setting that exceeds them is a typo, refused before it allocates
MAX_PARAMS = 10 ** 11
MAX_MACS = 10 ** 14
#: the largest seed: the data pipeline derives its seeds from 32 bits of each coordinate
MAX_SEED = 2 ** 32 - 1
#: the most classes of a synthetic dataset: ImageNet-21k has 21,841; 10^8 would make a classifier
#: of billions of parameters and logits of gigabytes per batch (refused before anything allocates them)
MAX_CLASSES = 10 ** 6
#: the largest float a training setting may hold: the optimizer and the schedule turn them into
#: float32 tensors, and a value beyond it (1e308) overflows there, after the cell has started
MAX_FLOAT32 = 3.4028234663852886e38


class _Section(BaseModel):
    # no inf or nan anywhere: no setting of a training run means anything at infinity
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    name: Literal["imagenet100", "imagenet1k", "imagefolder", "digits", "synthetic"] = Field(
        "digits", description="dataset: imagenet100, imagenet1k (the ILSVRC-2012 tree `ablate data imagenet1k` "
        "checks), imagefolder (any root/{train,val}/<class>/ tree), "
        "digits (embedded 8x8 handwritten digits), synthetic (random tensors)")
    root: Optional[str] = Field(None, description="dataset root with train/ and val/ folders "
                                "(imagenet100, imagefolder); ${VAR} is expanded")
    num_classes: PositiveInt = Field(10, le=MAX_CLASSES, description="number of classes (synthetic only)")
    train_size: PositiveInt = Field(1024, le=MAX_SYNTHETIC_IMAGES,
                                    description="number of training images (synthetic only)")
    val_size: PositiveInt = Field(256, le=MAX_SYNTHETIC_IMAGES,
                                  description="number of validation images (synthetic only)")
    loader: Literal["auto", "cache", "folder"] = Field(
        "auto", description="auto: the uint8 memory-mapped cache when one exists for this size, else "
        "the image-folder loader; cache: require the cache; folder: always decode image files")
    cache_dir: Optional[str] = Field(None, description="where `ablate data cache` wrote the decoded "
                                     "arrays (default: <root>/.ablate-cache)")
    cache_size: Optional[PositiveInt] = Field(None, description="stored short side of cached images "
                                              "(default: 8/7 of the image size, as in a 224/256 crop)")
    workers: int = Field(4, ge=0, description="data-loading worker processes (image-folder loader)")

    @property
    def needs_root(self) -> bool:
        return self.name in ("imagenet100", "imagenet1k", "imagefolder")


class ModelConfig(_Section):
    image_size: PositiveInt = Field(224, description="input height and width in pixels")
    patch_size: PositiveInt = Field(16, description="side p of the non-overlapping p x p patches")
    width: PositiveInt = Field(768, description="channels c of every block")
    depth: PositiveInt = Field(12, description="number of blocks N")
    mlp_ratio: float = Field(4.0, gt=0, description="expansion ratio r of the channel MLP (hidden = r*c)")
    shift: Union[str, list[list[int]]] = Field(
        "four", description="shift pattern: four, eight, up_right, left_down, up_down, left_right, up, "
        "down, left, right, none, or a list of [dy, dx] offsets (one channel group each)")
    border: Literal["keep", "zero"] = Field(
        "keep", description="what the row/column the content leaves holds: keep (its original value, "
        "the paper's pseudo-code) or zero (a fixed depthwise conv)")
    norm: Literal["layernorm", "affine"] = Field(
        "layernorm", description="layernorm, or affine (ResMLP's per-channel scale and shift, the deep model)")
    norm_position: Literal["post", "pre"] = Field(
        "post", description="post: x + Norm(f(x)) as in the paper's figures; pre: x + f(Norm(x))")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth rate (linearly increasing over blocks)")
    in_chans: PositiveInt = Field(3, description="input image channels")
    token_mixing: Literal["shift", "mlp", "dwconv", "none"] = Field(
        "shift", description="what mixes the patches in each block, between FC1's GELU and FC2: shift (the "
        "spatial shift of model.shift), mlp (MLP-Mixer's token-mixing MLP across the patches), dwconv (a learned "
        "depthwise convolution of model.kernel_size), none (no spatial mixing, the paper's FF; the same network "
        "as shift: none)")
    token_hidden: Optional[PositiveInt] = Field(
        None, description="hidden size of the token-mixing MLP (token_mixing: mlp; default: half the width, "
        "as MLP-Mixer)")
    kernel_size: PositiveInt = Field(3, description="side of the depthwise convolution (token_mixing: dwconv; odd)")
    timm: Optional[str] = Field(
        None, description="a timm model name (e.g. mixer_b16_224, resmlp_36_224): train that model instead of "
        "S²-MLP, with the same data and recipe; it takes image_size, drop_path and in_chans from here, "
        "the rest from timm_args")
    timm_args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of timm.create_model for model.timm (e.g. "
        "{patch_size: 16, embed_dim: 384}); num_classes, in_chans, img_size and drop_path_rate come from the "
        "data and model.image_size / model.drop_path")

    @model_validator(mode="before")
    @classmethod
    def _only_what_applies(cls, data):
        # A cell's model is S²-MLP or a timm model; the settings of the other kind that it
        # inherits (from the base block or --set) do not apply to it and take their defaults.
        # The spec builder refuses them where they are written beside the choice itself.
        if isinstance(data, dict):
            drop = S2MLP_ONLY if data.get("timm") is not None else ("timm_args",)
            data = {k: v for k, v in data.items() if k not in drop}
        return data

    @field_validator("timm")
    @classmethod
    def _timm_name(cls, v):
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.\-]+", v):
            raise ValueError(f"{v!r} is not a timm model name (allowed: a registered name such as mixer_b16_224; "
                             "timm.list_models() lists them)")
        return v

    @field_validator("timm_args")
    @classmethod
    def _timm_args(cls, v):
        for name, value in v.items():
            if name in TIMM_ARGS_FROM_ABLATE:
                raise ValueError(f"timm_args.{name} is set by ablate (allowed: {TIMM_ARGS_FROM_ABLATE[name]})")
            if not _plain(value):
                raise ValueError(f"timm_args.{name}: {value!r} is not a plain value (allowed: numbers, strings, "
                                 "booleans, null and lists of them)")
        return v

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, v):
        if v % 2 == 0:
            raise ValueError(f"kernel_size {v} is even (allowed: an odd size, so the patch grid keeps its shape)")
        return v

    @field_validator("shift", mode="before")
    @classmethod
    def _shift_shape(cls, v):
        # checked before pydantic's union coercion, which would report one error per union member
        if not isinstance(v, (str, list, tuple)):
            raise ValueError(f"expected a pattern name or a list of [dy, dx] offsets, got {v!r} (allowed: "
                             "four, eight, up_right, left_down, up_down, left_right, up, down, left, right, "
                             "none, or [[dy, dx], ...])")
        resolve_offsets(v)
        return v

    @field_validator("shift")
    @classmethod
    def _known_shift(cls, v):
        resolve_offsets(v)  # raises ValueError naming the allowed values
        return v

    # -- values that overflow (hidden = mlp_ratio x width): refused before the model checks --
    @field_validator("mlp_ratio")
    @classmethod
    def _fits_float32(cls, v):
        return _float32(v)

    @model_validator(mode="after")
    def _operator_settings(self):
        """Settings of one token-mixing operator are refused with another, unless at their defaults."""
        if self.timm is not None:
            return self
        mixing = self.token_mixing
        if mixing != "shift" and not (self.shift == "four" or (mixing == "none" and self.shift == "none")):
            raise ValueError(f"shift {self.shift!r} applies to token_mixing: shift only, not token_mixing: {mixing} "
                             "(allowed: leave shift out, or token_mixing: shift)")
        if mixing != "shift" and self.border != "keep":
            raise ValueError(f"border {self.border} applies to token_mixing: shift only, not token_mixing: {mixing} "
                             "(allowed: leave border out, or token_mixing: shift)")
        if mixing != "mlp" and self.token_hidden is not None:
            raise ValueError(f"token_hidden {self.token_hidden} applies to token_mixing: mlp only, not token_mixing: "
                             f"{mixing} (allowed: leave token_hidden out, or token_mixing: mlp)")
        if mixing != "dwconv" and self.kernel_size != 3:
            raise ValueError(f"kernel_size {self.kernel_size} applies to token_mixing: dwconv only, not "
                             f"token_mixing: {mixing} (allowed: leave kernel_size out, or token_mixing: dwconv)")
        return self

    @model_validator(mode="after")
    def _consistent(self):
        if self.timm is not None:
            return self  # timm checks its own arguments (the spec builder builds it once)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size "
                             f"{self.patch_size} (allowed: a patch size that divides the image size)")
        groups = len(resolve_offsets(self.shift))
        if groups and self.width % groups:
            raise ValueError(f"width {self.width} is not divisible by the {groups} channel groups of "
                             f"shift {self.shift!r} (allowed: a multiple of {groups})")
        if self.hidden < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio:g} x width {self.width} leaves no hidden channel "
                             "(allowed: mlp_ratio x width >= 1)")
        cost = model_cost(self, 0)
        if cost.params_paper > MAX_PARAMS or cost.macs > MAX_MACS:
            raise ValueError(f"width {self.width}, depth {self.depth}, mlp_ratio {self.mlp_ratio:g}, image_size "
                             f"{self.image_size}, patch_size {self.patch_size}: {cost.params_paper:.3g} parameters "
                             f"and {cost.macs:.3g} multiply-adds per image (allowed: at most {MAX_PARAMS:.0e} "
                             f"parameters and {MAX_MACS:.0e} multiply-adds per image)")
        return self

    @property
    def hidden(self) -> int:
        return int(round(self.mlp_ratio * self.width))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_mlp_hidden(self) -> int:
        """Hidden size of the token-mixing MLP: ``token_hidden``, else half the width (MLP-Mixer's 0.5)."""
        return self.token_hidden or max(1, int(0.5 * self.width))


#: the settings only an S²-MLP cell has (a timm cell leaves them at their defaults)
S2MLP_ONLY = ("patch_size", "width", "depth", "mlp_ratio", "shift", "border", "norm", "norm_position",
              "token_mixing", "token_hidden", "kernel_size")
#: timm.create_model arguments that ablate sets itself, and where they come from
TIMM_ARGS_FROM_ABLATE = {"num_classes": "the data's classes", "in_chans": "model.in_chans",
                         "img_size": "model.image_size", "drop_path_rate": "model.drop_path",
                         "pretrained": "nothing: no weights are downloaded, every model trains from scratch"}


def _plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


class TrainConfig(_Section):
    epochs: PositiveInt = Field(100, description="training epochs")
    batch_size: PositiveInt = Field(128, description="images per optimizer step")
    lr: float = Field(1.0e-3, gt=0, description="peak learning rate (AdamW), reached after warm-up")
    min_lr: float = Field(1.0e-5, ge=0, description="learning rate at the end of the cosine decay")
    warmup_epochs: float = Field(5, ge=0, description="epochs of linear warm-up from warmup_lr")
    warmup_lr: float = Field(1.0e-6, ge=0, description="learning rate at the start of warm-up")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decoupled weight decay (not on norms and biases)")
    optimizer: Literal["adamw", "sgd", "lamb"] = Field("adamw", description="optimizer (timm create_optimizer_v2)")
    grad_clip: Optional[float] = Field(None, gt=0, description="clip the gradient norm to this value")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the cross-entropy loss")
    mixup: float = Field(0.0, ge=0, description="Mixup alpha (0 = off); DeiT uses 0.8")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (0 = off); DeiT uses 1.0")
    randaugment: Optional[str] = Field(
        None, description="timm augmentation policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment; also augmix-..., "
        "original, v0, ...: the image-folder loader only) (None = off)")
    random_erasing: float = Field(0.0, ge=0, le=1, description="random erasing probability; DeiT uses 0.25")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability (0 for digits)")
    crop_scale: float = Field(0.08, gt=0, le=1, description="smallest area fraction of the random resized crop")
    amp: Literal["bf16", "fp16", "off"] = Field("bf16", description="mixed precision on CUDA (CPU always runs fp32)")
    compile: bool = Field(False, description="torch.compile the model (CUDA; slow to start on CPU)")
    micro_batch: Union[PositiveInt, Literal["auto"]] = Field(
        "auto", description="images per forward/backward pass on each device; batch_size must be a multiple of "
        "micro_batch x processes (gradients are summed over the passes). auto: the largest that fits the GPU "
        "(probed once per configuration and GPU model, halved on out-of-memory), the whole batch on a CPU")
    grad_checkpointing: bool = Field(False, description="recompute each block's activations in the backward "
                                     "pass instead of keeping them (timm's set_grad_checkpointing): less memory, "
                                     "about a third more compute")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="random seed of initialisation, data order and augmentation")
    eval_train_images: int = Field(
        10_000, ge=0, description="training images evaluated after every epoch like the validation split (eval "
        "mode, no augmentation; the same fixed subset for every epoch and cell of a dataset): train_top1 and "
        "train_loss_eval, for the train - val gap (0 = off; the whole split if smaller)")

    @model_validator(mode="after")
    def _micro_batch_divides(self):
        if isinstance(self.micro_batch, int):
            if self.batch_size % self.micro_batch:
                raise ValueError(f"micro_batch {self.micro_batch} does not divide batch_size {self.batch_size} "
                                 "(allowed: a divisor of batch_size, or auto)")
            if (self.mixup > 0 or self.cutmix > 0) and self.micro_batch % 2:
                raise ValueError(f"micro_batch {self.micro_batch} is odd, and Mixup/CutMix pair the images of a "
                                 "pass (allowed: an even micro_batch, or auto)")
        return self

    @field_validator("randaugment")
    @classmethod
    def _known_policy(cls, v):
        if v is not None:
            check_policy(v)  # timm's own parser; raises ValueError naming the allowed forms
        return v

    # -- input that would fail only once the cell trains: refused with the spec's other problems --
    @field_validator("lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "grad_clip", "mixup", "cutmix")
    @classmethod
    def _fits_float32(cls, v):
        return _float32(v)

    @model_validator(mode="after")
    def _even_batch_for_mixup(self):
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"batch_size {self.batch_size} is odd, and Mixup/CutMix pair the images of a batch "
                             "(allowed: an even batch_size, or mixup: 0 and cutmix: 0)")
        return self


def _float32(v: Optional[float]) -> Optional[float]:
    if v is not None and abs(v) > MAX_FLOAT32:
        raise ValueError(f"{v:g} does not fit a 32-bit float (allowed: at most {MAX_FLOAT32:.3g})")
    return v


class CellConfig(_Section):
    """One fully resolved training configuration."""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @property
    def num_classes(self) -> int:
        return num_classes(self.data)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}

#: settings that say where things are on one machine, not what is trained: left out of the key
#: so that workers on machines with different paths share one grid.
MACHINE_LOCAL = {"data.root", "data.cache_dir", "data.workers", "data.loader",
                 # how a step's batch is split over passes and devices changes what fits, not what is
                 # trained (ablate/batching.py): a cell may resume on another GPU with another split
                 "train.micro_batch", "train.grad_checkpointing"}


#: settings added after cells were first keyed, with the value every earlier cell had: left out of
#: the key at that value, so that earlier cells keep their keys
KEYED_WHEN_SET = {"model.token_mixing": "shift", "model.token_hidden": None, "model.kernel_size": 3,
                  "model.timm": None, "model.timm_args": {}, "train.eval_train_images": 10_000}
#: the identity entry that ties a timm cell to the timm release that defines its model
TIMM_VERSION = "timm.version"


def num_classes(data: DataConfig) -> int:
    """Number of classes without reading any image (imagefolder: its train/ sub-folders)."""
    if data.name in NUM_CLASSES:
        return NUM_CLASSES[data.name]
    if data.name == "synthetic":
        return data.num_classes
    train = Path(data.root or ".") / "train"
    return sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else 0


#: the settings of one token mixer only
OPERATOR_SETTINGS = {"shift": "shift", "border": "shift", "token_hidden": "mlp", "kernel_size": "dwconv"}


def applies(dotted: str, timm: Optional[str], token_mixing: str) -> bool:
    """Whether a setting means anything for a cell whose model is ``timm`` (or S²-MLP with
    ``token_mixing``): S²-MLP's own settings do not for a timm model, nor ``model.timm_args`` for
    S²-MLP, nor one token mixer's settings for another (each sits at its default there)."""
    section, _, name = dotted.partition(".")
    if section != "model":
        return True
    if timm is not None:
        return name not in S2MLP_ONLY
    return name != "timm_args" and OPERATOR_SETTINGS.get(name, token_mixing) == token_mixing


def flat_params(cfg: CellConfig) -> dict[str, Any]:
    """``{"model.shift": "four", "train.lr": 0.001, ...}``: the dotted form used in specs and MLflow."""
    out = {}
    for section, values in cfg.model_dump(mode="json").items():
        for name, value in values.items():
            out[f"{section}.{name}"] = value
    return out


def identity(cfg: CellConfig) -> dict[str, Any]:
    """What a cell's key is a hash of: its dotted settings without the machine-local ones and
    the later ones at their old value; ``token_mixing: none`` as ``shift: none`` (one network,
    one cell); a timm model with the timm release that defines it."""
    flat = flat_params(cfg)
    if flat["model.token_mixing"] == "none":
        flat["model.token_mixing"], flat["model.shift"] = "shift", "none"
    out = {k: v for k, v in flat.items()
           if k not in MACHINE_LOCAL and not (k in KEYED_WHEN_SET and v == KEYED_WHEN_SET[k])}
    if cfg.model.timm is not None:
        out[TIMM_VERSION] = version("timm")
    return out


def cell_key(cfg: CellConfig) -> str:
    """Stable identity of a configuration: a hash of its canonical resolved form.

    Independent of YAML key order, comments, file names and where a value came from, and of
    the machine-local settings (paths, loader choice, worker counts).
    """
    return key_of(identity(cfg))


#: json.dumps(..., sort_keys=True, separators=(",", ":")), without building an encoder per call
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def key_of(identity_: dict[str, Any]) -> str:
    """The cell key of an :func:`identity`."""
    return hashlib.sha256(_CANONICAL.encode(identity_).encode()).hexdigest()[:16]


def keys_by_seed(identity_: dict[str, Any], seeds: list[int]) -> list[str]:
    """``key_of`` the identity with each of ``seeds`` as its ``train.seed``, encoding it once:
    the seed is an integer, written as ``str(seed)`` at one place of the canonical text."""
    marker = "\x00seed\x00"  # encoded as "\u0000seed\u0000": in no other value of a configuration
    parts = _CANONICAL.encode({**identity_, "train.seed": marker}).split(json.dumps(marker))
    if len(parts) != 2:  # the marker twice: encode each in full
        return [key_of({**identity_, "train.seed": seed}) for seed in seeds]
    return [hashlib.sha256(f"{parts[0]}{int(seed)}{parts[1]}".encode()).hexdigest()[:16] for seed in seeds]

"""``ablate plan``: what a spec will train and roughly what it costs, before anything runs.

One row per cell (its varied values, parameters, GMACs and an estimated device-hours figure:
GPU-hours on a GPU, CPU-hours on a CPU) and the totals. Nothing is trained, no dataset is read
(``imagefolder`` sizes are counted by listing files, without decoding) and nothing is written.

Each cell is priced in device-hours from what earlier runs measured (:mod:`ablate.pricing`): the
throughput of the same configuration on the same kind of device, else the FLOP model at the MFU
runs on that device achieved, else at an MFU the user states (``--mfu``); otherwise it is not
priced. Each row says which, and the plan's header says which device it prices for and why:
``--gpu``, this machine's GPU, or (told nothing about the GPU, and seeing none) an assumed H100.
``--gpu-memory`` alone names a GPU's memory, not its kind: such a plan prices nothing rather than
price a GPU of one memory as an H100 of another.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ablate import names, text
from ablate.config import CellConfig, DataConfig, flat_params
from ablate.data.scan import count_images
from ablate.devices import local_gpu, peak_flops
from ablate.errors import AblateError
from ablate.memory import DEFAULT_GPU_MEMORY, plan_memory
from ablate.models.zoo import activation_bytes, model_cost
from ablate.pricing import REFERENCE_GPU, Measured, Price, Pricer, is_cpu, measured_runs
from ablate.spec.reference import matching_row
from ablate.spec.types import ReferenceRow
from ablate.units import PaperUnits, macs_in, paper_number, params_in

#: (train, val) images. imagenet100: the CMC class list (docs/paper.md); digits: a fixed stratified
#: 80/20 split of scikit-learn's 1,797 digits.
DATASET_SIZES = {"imagenet100": (126_689, 5_000), "imagenet1k": (1_281_167, 50_000), "digits": (1_437, 360)}
#: at most this many corner combinations of a search space are costed
MAX_SEARCH_CORNERS = 4096


#: GPU counts the plan gives a wall-time estimate for
WALL_GPUS = (1, 8)


def dataset_sizes(data: DataConfig) -> Optional[tuple[int, int]]:
    """(train, val) image counts without decoding anything; ``None`` when a folder is missing."""
    if data.name in DATASET_SIZES:
        return DATASET_SIZES[data.name]
    if data.name == "synthetic":
        return data.train_size, data.val_size
    root = Path(data.root or "")
    if not data.root or not (root / "train").is_dir():
        return None
    return count_images(root)  # the files training reads, listed the same way


def assumptions(pricer: Pricer) -> dict[str, Any]:
    mfu, runs = pricer.measured_mfu()
    return {
        "device": pricer.device or None,
        "unit": {"CPU-h": "CPU-hours", "GPU-h": "GPU-hours"}.get(pricer.unit),  # what gpu_hours are hours of
        "peak_tflops": pricer.peak / 1e12 if pricer.peak else None,
        "measured_runs_on_device": len(pricer.on_device()),
        "measured_mfu": mfu, "measured_mfu_runs": runs, "stated_mfu": pricer.mfu,
        "flops_per_train_image": "6 x MACs (forward + backward)",
        "flops_per_val_image": "2 x MACs (forward), every epoch",
        "order": "measured throughput of the configuration, else the FLOP model at the measured MFU, else at "
                 "--mfu, else not priced",
    }


#: the reference row of a cell the paper has no row for: no numbers, the default units
NO_ROW = ReferenceRow({})


@dataclass
class PlanRow(PaperUnits):
    """One cell: what varies, its analytic cost and the estimated compute."""
    key: str
    seed: int
    values: dict[str, Any]
    params: int              # every parameter of the model
    params_paper: int        # paper convention: classifier and norms excluded
    macs: int                # multiply-adds per image (the paper's "FLOPs")
    flops: int               # 2 x macs
    epochs: int
    train_images: Optional[int]
    val_images: Optional[int]
    gpu_hours: Optional[float]         # device-hours, of a CPU on a CPU plan (None: not priced)
    reference: Optional[ReferenceRow] = None  # the spec's matching reference row (the paper's numbers)
    priced_by: str = ""                # "measured", "MFU 38%", "MFU 40% (--mfu)", "" (not priced)
    price_detail: str = ""
    activation_mb: float = 0.0         # what autograd keeps per training image (analytic, bf16 on CUDA), MB
    micro_batch: int = 0               # the micro-batch that fits the plan's GPU memory (0: not even 1)
    micro_batch_checkpointed: int = 0  # ... with train.grad_checkpointing
    batch_size: int = 0
    counted: bool = False              # cost counted on a forward pass (a timm model), not analytic

    def params_in_paper_units(self) -> float:
        """Paper-convention parameters in the unit the reference row uses (M = 10^6, Mi = 2^20)."""
        return params_in(self.params_paper, (self.reference or NO_ROW).params_unit or "M")

    def gmacs_in_paper_units(self) -> float:
        """MACs per image in the unit the reference row uses (G = 10^9, Gi = 2^30)."""
        return macs_in(self.macs, (self.reference or NO_ROW).macs_unit or "G")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(params_m=self.params_m, params_mi=self.params_mi, gmacs=self.gmacs)
        if self.reference is not None:
            out["reference"] = self.reference.to_dict()
            out["ours_in_paper_units"] = {"params": self.params_in_paper_units(),
                                          "gmacs": self.gmacs_in_paper_units()}
        return out


@dataclass
class SearchPlan:
    """Per-trial cost bounds of a search, from the corners of its space."""
    sampler: str
    objectives: list[dict[str, str]]
    trials: int
    pruner: str
    space: dict[str, dict[str, Any]]
    corners: int                    # combinations costed (the valid ones)
    gmacs: tuple[float, float]      # per trial, min and max
    params_m: tuple[float, float]
    gpu_hours_per_trial: Optional[tuple[float, float]]

    @property
    def gpu_hours(self) -> Optional[tuple[float, float]]:
        if self.gpu_hours_per_trial is None:
            return None
        return self.gpu_hours_per_trial[0] * self.trials, self.gpu_hours_per_trial[1] * self.trials


@dataclass
class Plan:
    """Everything ``ablate plan`` prints; :meth:`to_json` for machines, :meth:`to_text` for people."""
    name: str
    path: str
    kind: str                       # grid | search
    varied: list[str]
    seeds: list[int]
    data: str                       # dataset name of the base configuration
    images: Optional[tuple[int, int]]   # its (train, val) image counts; None when unknown
    rows: list[PlanRow] = field(default_factory=list)
    search: Optional[SearchPlan] = None
    reference_source: Optional[str] = None
    spec_name: str = ""                 # the spec's own name (``name`` is the experiment)
    origin: str = ""                    # Spec.origin(): the spec and --set behind another experiment name
    overrides: dict[str, Any] = field(default_factory=dict)
    data_problems: list[str] = field(default_factory=list)   # why `ablate run` would refuse the data now
    gpu_memory: int = DEFAULT_GPU_MEMORY   # bytes of one GPU, for the micro-batch column
    gpu_memory_source: str = "80 GB, an H100/A100 (no GPU here; --gpu-memory to choose)"
    processes: int = 1                     # --gpus-per-cell
    pricer: Optional[Pricer] = None
    device_source: str = ""                # why the plan prices for pricer.device (the header says it)

    @property
    def configurations(self) -> int:
        return len({json.dumps({k: v for k, v in r.values.items() if k != names.SEED}, sort_keys=True)
                    for r in self.rows})

    @property
    def gpu_hours(self) -> Optional[float]:
        hours = [r.gpu_hours for r in self.rows]
        return None if any(h is None for h in hours) else sum(hours)

    def wall_hours(self, gpus: int) -> Optional[float]:
        """Estimated wall time with one worker per GPU: each cell, longest first, goes to the GPU
        that frees up first, as workers drain the ledger (`ablate run` queues the longest first)."""
        hours = [r.gpu_hours for r in self.rows]
        if not hours or any(h is None for h in hours):
            return None
        load = [0.0] * gpus
        for h in sorted(hours, reverse=True):
            load[load.index(min(load))] += h
        return max(load)

    def totals(self) -> dict[str, Any]:
        out = {"cells": len(self.rows), "configurations": self.configurations, "seeds": len(self.seeds),
               "gpu_hours": self.gpu_hours, "wall_hours": {str(g): self.wall_hours(g) for g in WALL_GPUS}}
        if self.search is not None:
            out.update(trials=self.search.trials, gpu_hours=self.search.gpu_hours)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.path, "spec_name": self.spec_name, "overrides": self.overrides,
                "kind": self.kind, "varied": self.varied,
                "seeds": self.seeds, "reference_source": self.reference_source,
                "data": {"name": self.data, "train_images": self.images[0] if self.images else None,
                         "val_images": self.images[1] if self.images else None},
                "data_problems": self.data_problems,
                "rows": [r.to_dict() for r in self.rows],
                "search": None if self.search is None else {**asdict(self.search), "gpu_hours": self.search.gpu_hours},
                "totals": self.totals(),
                "pricing": {**assumptions(self.pricer), "device_source": self.device_source}}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        return format_plan(self)


def _row(cell_config: CellConfig, key: str, seed: int, values: dict, reference: Optional[ReferenceRow],
         pricer: Pricer, memory: int = DEFAULT_GPU_MEMORY, processes: int = 1) -> PlanRow:
    classes = cell_config.num_classes
    cost = model_cost(cell_config.model, classes)
    sizes = dataset_sizes(cell_config.data)
    t = cell_config.train
    price = pricer.price(cell_config, cost.macs, *sizes) if sizes else Price(None, "", "image counts unknown")
    precision = t.amp if t.amp != "off" else "fp32"
    per_image, micro, micro_ckpt = plan_memory(
        activation_bytes(cell_config.model, classes, precision),
        activation_bytes(cell_config.model, classes, precision, grad_checkpointing=True),
        cost.params, t.batch_size, processes, memory)
    return PlanRow(key=key, seed=seed, values=values, params=cost.params, params_paper=cost.params_paper,
                   macs=cost.macs, flops=cost.flops, epochs=t.epochs,
                   train_images=sizes[0] if sizes else None, val_images=sizes[1] if sizes else None,
                   gpu_hours=price.hours, reference=reference, priced_by=price.source, price_detail=price.detail,
                   activation_mb=per_image / 1e6, micro_batch=micro,
                   micro_batch_checkpointed=micro_ckpt, batch_size=t.batch_size, counted=cost.counted)


def priced_device(gpu: Optional[str], here: Optional[tuple], memory_given: bool) -> tuple[str, str]:
    """(the kind of device a plan prices for, why): ``gpu``, else this machine's GPU, else, when
    nothing was said about the GPU, the :data:`REFERENCE_GPU` the default 80 GB is of (assumed,
    and said so); with ``--gpu-memory`` alone, none ("" and nothing priced): a memory is no kind
    of GPU, and pricing a 24 GB GPU as an H100 would be a figure for a GPU the user does not have."""
    if gpu:
        return gpu, f"--gpu {gpu}"
    if here:
        return here[0], "this machine's GPU; --gpu NAME for another"
    if memory_given:
        return "", ("--gpu-memory gives a GPU's memory, not its kind, and no GPU is here: nothing is priced; "
                    "--gpu NAME to price, e.g. --gpu A100 or --gpu cpu")
    return REFERENCE_GPU, "assumed: no GPU here, no --gpu and no --gpu-memory; --gpu NAME for another"


def plan(spec, gpu_memory: Optional[int] = None, processes: int = 1, gpu: Optional[str] = None,
         mfu: Optional[float] = None, runs: Optional[list[Measured]] = None) -> Plan:
    """The plan of a loaded :class:`~ablate.spec.Spec`: rows, totals, each cell priced for ``gpu``
    (default: this machine's GPU, else, with no ``gpu_memory`` either, an H100; :func:`priced_device`)
    from the ``runs`` measured (default: the MLflow store's), and the micro-batch that fits
    ``gpu_memory`` bytes (default: this machine's GPU, else 80 GB)."""
    here = local_gpu()
    device, device_source = priced_device(gpu, here, gpu_memory is not None)
    source = "--gpu-memory"
    if gpu_memory is None and here:
        gpu_memory, source = here[1], "this machine's GPU"
    if gpu_memory is None:
        gpu_memory, source = DEFAULT_GPU_MEMORY, "no GPU here: an 80 GB H100/A100; --gpu-memory to choose"
    pricer = Pricer(device, measured_runs() if runs is None else runs, mfu,
                    peak_flops(device, "bf16") if device and not is_cpu(device) else None)
    result = Plan(name=spec.name, path=str(spec.path), kind=spec.kind, varied=list(spec.varied),
                  seeds=list(spec.seeds), data=spec.base.data.name, images=dataset_sizes(spec.base.data),
                  reference_source=spec.reference.source if spec.reference is not None else None,
                  spec_name=spec.spec_name,
                  origin=spec.origin(), overrides=dict(spec.overrides), data_problems=list(spec.data_problems),
                  gpu_memory=gpu_memory, gpu_memory_source=source, processes=processes, pricer=pricer,
                  device_source=device_source)
    for cell in spec.cells():
        result.rows.append(_row(cell.config, cell.key, cell.seed, cell.values,
                                matching_row(spec.reference, flat_params(cell.config)), pricer, gpu_memory, processes))
    if spec.search is not None:
        result.search = _search_plan(spec, pricer)
    return result


def _corner_values(param) -> list[Any]:
    if param.kind == "choice":
        return list(param.choices)
    high = param.high
    if param.kind == "int" and param.step:
        high = param.low + (param.high - param.low) // param.step * param.step  # the largest reachable value
    return [param.low, high] if high != param.low else [param.low]


def _search_plan(spec, pricer: Pricer) -> SearchPlan:
    """Cost bounds per trial over the corners of the space (cost grows monotonically in each
    numeric setting, so the corners bound it); invalid combinations are skipped."""
    search = spec.search
    keys = list(search.space)
    rows = []
    for combo in itertools.islice(itertools.product(*(_corner_values(search.space[k]) for k in keys)),
                                  MAX_SEARCH_CORNERS):
        try:
            config = spec.resolve(dict(zip(keys, combo)))
        except AblateError:
            continue
        rows.append(_row(config, "", config.train.seed, {}, None, pricer))
    if not rows:
        raise AblateError(f"{spec.path}: search.space: no corner of the space is a valid configuration "
                          "(allowed: bounds and choices that combine into valid models)")
    hours = [r.gpu_hours for r in rows]
    return SearchPlan(
        sampler=search.sampler, objectives=[asdict(o) for o in search.objectives], trials=search.trials,
        pruner=search.pruner, space={k: {f: v for f, v in asdict(p).items() if v not in (None, False)}
                                     for k, p in search.space.items()},
        corners=len(rows), gmacs=(min(r.gmacs for r in rows), max(r.gmacs for r in rows)),
        params_m=(min(r.params_m for r in rows), max(r.params_m for r in rows)),
        gpu_hours_per_trial=None if None in hours else (min(hours), max(hours)))


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

def _hours(h: Optional[float]) -> str:
    """Two significant digits below 0.01 h (a CPU cell of the quickstart is a few seconds: "<0.01"
    told nothing), three up to 10 h, then one decimal."""
    if h is None:
        return "?"
    if h < 0.0001:
        return "<0.0001"
    if h < 0.01:
        return f"{h:.2g}"
    return f"{h:.3g}" if h < 10 else f"{h:,.1f}"


def _range(bounds: tuple[float, float], fmt) -> str:
    lo, hi = (fmt(b) if callable(fmt) else fmt.format(b) for b in bounds)
    return lo if lo == hi else f"{lo} to {hi}"


def _space_label(param: dict[str, Any]) -> str:
    """A parameter as written in the spec: ``int [64, 768], step 64``, ``choice [none, four]``."""
    if param["kind"] == "choice":
        return "choice " + json.dumps(param["choices"], separators=(", ", ":"))
    label = f"{param['kind']} [{text.number(param['low'])}, {text.number(param['high'])}]"
    return (label + (f", step {text.number(param['step'])}" if param.get("step") else "")
            + (", log" if param.get("log") else ""))


def _paper(top: Optional[float]) -> str:
    return "-" if top is None else f"{top:.1f}"


def _micro(r: PlanRow) -> str:
    """``1024`` (the whole batch fits), ``256 x4`` (passes per step), ``ckpt 64`` (only with checkpointing)."""
    if r.micro_batch:
        passes = r.batch_size // r.micro_batch
        return str(r.micro_batch) + (f" x{passes}" if passes > 1 else "")
    if r.micro_batch_checkpointed:
        return f"ckpt {r.micro_batch_checkpointed}"
    return "none"


def _memory_note(p: Plan) -> str:
    per = f" per process of {p.processes}" if p.processes > 1 else ""
    return (f"MB/img: what autograd keeps per training image (analytic, bf16 autocast on CUDA); micro: the largest "
            f"micro-batch{per} that fits {p.gpu_memory / 1e9:.0f} GB ({p.gpu_memory_source}) with the weights, "
            f"gradients and AdamW state, x passes per step (what train.micro_batch: auto finds by probing; ckpt: "
            "only with train.grad_checkpointing: true)")


def device_line(p: Plan) -> str:
    """The header's ``priced for:`` line: the device the plan prices for, why, and the unit."""
    pricer = p.pricer
    if not pricer.device:
        return f"priced for: no kind of GPU ({p.device_source})"
    unit = "CPU-hours" if is_cpu(pricer.device) else "GPU-hours"
    return f"priced for: {pricer.device}, in {unit} ({p.device_source})"


def _pricing_note(p: Plan) -> str:
    """Where the device-hours come from, for the device the plan prices for."""
    pricer = p.pricer
    if not pricer.device:
        return (f"{pricer.unit}: not priced, no kind of device named (see 'priced for' above): measured runs and "
                "the FLOP model each price one kind of device.")
    mfu, runs = pricer.measured_mfu()
    peak = f"{pricer.peak / 1e12:.0f} TFLOP/s dense bf16 peak" if pricer.peak else "no known peak"
    lines = [f"{pricer.unit}: device-hours on {pricer.device} ({peak}; --gpu NAME for another), priced by: "
             f"'measured', the median throughput of finished runs of the same configuration on it "
             f"({len(pricer.on_device())} run(s) in the MLflow store); 'MFU m', the FLOP model (6 x MACs per "
             "training image, 2 x MACs per validation image, every epoch) at the MFU its runs achieved"
             + (f" (median {mfu:.0%} over {runs} run(s))" if mfu else " (none measured yet)")
             + (f" or at --mfu {pricer.mfu:g}" if pricer.mfu else "") + "."]
    if any(r.gpu_hours is None for r in p.rows) or (p.search and p.search.gpu_hours_per_trial is None):
        lines.append(f"'-': nothing measured on {pricer.device} yet, and nothing is assumed: train a cell there (or "
                     "run bench/gpu_acceptance.py), or state an MFU with --mfu 0.4.")
    return "\n".join(lines)


def format_plan(p: Plan) -> str:
    data = f"{p.data} (" + (f"{p.images[0]:,} train / {p.images[1]:,} val images" if p.images
                            else "image counts unknown") + ")"
    unit = p.pricer.unit
    lines = [f"plan: {p.name} ({p.path})", device_line(p)]
    if p.origin:
        lines += [f"experiment: {p.name} ({p.origin}; --name to choose another)"]
    if p.search is not None:
        s = p.search
        objectives = ", ".join(f"{o['direction']} {o['metric']}" for o in s.objectives)
        lines += [f"search: {s.trials} trials, sampler {s.sampler}, pruner {s.pruner}; {objectives}",
                  f"data: {data}", ""]
        body = [[k, _space_label(spec)] for k, spec in s.space.items()]
        lines += text.aligned(["setting", "space"], body, left=2)
        hours = s.gpu_hours_per_trial
        lines += ["", f"per trial (over {s.corners} corners of the space): params {_range(s.params_m, '{:.3g}')} M, "
                  f"{_range(s.gmacs, '{:.3g}')} GMACs, "
                  + (f"{_range(hours, _hours)} {unit}" if hours else f"{unit} unknown"),
                  f"total for {s.trials} trials: "
                  + (f"{_range(s.gpu_hours, _hours)} {unit} (estimate)" if hours else f"{unit} unknown")]
    else:
        lines += [f"{text.plural(len(p.rows), 'cell')} = {text.plural(p.configurations, 'configuration')} x "
                  f"{text.plural(len(p.seeds), 'seed')}; data: {data}", ""]
        varied = [k for k in p.varied if k != names.SEED] + ([names.SEED] if names.SEED in p.varied else [])
        labels = varied or ["cell"]
        header = labels + ["params (M)", "GMACs", "epochs", unit, "priced by", "MB/img", "micro"]
        ref = p.reference_source is not None
        if ref:
            header += ["| paper top-1", "top-5", "params", "GMACs"]
        header += ["key"]
        body = []
        for r in p.rows:
            row = r.reference or NO_ROW
            mi = " Mi" if row.params_unit == "Mi" else ""
            gi = " Gi" if row.macs_unit == "Gi" else ""
            line = [text.number(r.values[k]) if r.values[k] is not None else "-" for k in varied] or ["base"]
            counted = " c" if r.counted else ""
            line += [paper_number(r.params_in_paper_units()) + mi + counted,
                     paper_number(r.gmacs_in_paper_units()) + gi + counted,
                     str(r.epochs), _hours(r.gpu_hours), r.priced_by or "-", f"{r.activation_mb:.3g}", _micro(r)]
            if ref:
                line += [_paper(row.top1), _paper(row.top5),
                         text.number("-" if row.params_m is None else row.params_m) + mi,
                         text.number("-" if row.gmacs is None else row.gmacs) + gi]
            body.append(line + [r.key])
        total = ["total"] + [""] * (len(labels) + 2) + [_hours(p.gpu_hours), "", "", ""]
        body.append(total + [""] * (len(header) - len(total)))
        lines += text.aligned(header, body, left=len(labels))
        if p.gpu_hours is not None:
            kind = "CPU" if unit == "CPU-h" else "GPU"
            lines += ["", f"wall time (one worker per {kind}): " + ", ".join(
                f"{g} {kind}{'s' if g > 1 else ''} {_hours(p.wall_hours(g))} h" for g in WALL_GPUS)]
        if p.reference_source:
            lines += ["", f"paper: {p.reference_source}"]
        lines += ["", _memory_note(p)]
        tight = [r for r in p.rows if not r.micro_batch]
        if tight:
            lines += [f"warning: {text.plural(len(tight), 'cell')} cannot fit {p.gpu_memory / 1e9:.0f} GB even at "
                      "micro-batch 1 without activation checkpointing: set train.grad_checkpointing: true"
                      + ("" if all(r.micro_batch_checkpointed for r in tight) else
                         " (some do not fit even then: a smaller model or a larger GPU)")]
    if p.data_problems:
        lines += ["", "data not in place yet (`ablate run` refuses to start until it is):"]
        lines += [f"  {problem}" for problem in p.data_problems]
    lines += ["",
              "params: the paper's convention (patch FC + blocks; classifier and norms excluded), in 10^6 "
              "(Mi: 2^20, where the paper's row uses it);",
              "GMACs: multiply-adds per image / 10^9 (Gi: / 2^30), the paper's \"FLOPs\" (FLOPs = 2 x MACs).",
              *(["c: counted on a forward pass of the timm model (torch.utils.flop_counter; params without the "
                 "classifier, norms included); the rest analytic (paper §3.4)."] if any(r.counted for r in p.rows) else []),
              _pricing_note(p)]
    return "\n".join(lines)

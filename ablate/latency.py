"""Inference cost measured on the user's own target: latency per image and throughput.

MACs count multiply-adds; they do not count the memory traffic of the spatial shift (free in
MACs), of LayerNorm, GELU and the residual adds, nor the per-call overhead that dominates a
small model at batch 1. ``ablate latency SPEC`` therefore builds every configuration of a spec
(or every configuration of a search's finished trials), with random weights and a random
input (no training, no data), and times its forward pass:

- under ``torch.inference_mode()`` with the model in eval mode, ``--precision bf16`` through
  autocast (as training computes);
- after a warm-up (at least :data:`WARMUP_REPEATS` passes and :data:`WARMUP_SECONDS`, which
  takes the one-time costs: allocator, oneDNN primitives, cuDNN/cuBLAS handles);
- then at least :data:`MIN_REPEATS` timed passes and ``seconds`` of them, each timed on its own
  (CUDA synchronised before and after): the median is the latency, the 25th and 75th
  percentiles its spread (the interquartile range), min and max are kept for the record.

Latency is per image (a pass's time divided by the batch; at batch 1, the latency a single
request sees); throughput is images per second at that batch (batch / median pass time).

Where it is recorded (MLflow, in the spec's experiment): a **target** names the machine a
measurement belongs to, e.g. ``cpu-amd-epyc-t2`` (CPU model, threads) or ``cuda-h200`` (GPU),
with ``-b<batch>`` and ``-bf16`` where not batch 1 and fp32. Each configuration (the resolved
configuration but the seed, as ``ablate report`` groups runs) has one MLflow run tagged
``ablate.role=latency`` holding its params and, per target, the metrics ``latency_ms.<target>``
(median), ``latency_ms_p25.<target>``, ``latency_ms_p75.<target>``, ``throughput.<target>``
and the tag ``ablate.latency.<target>.machine`` (CPU or GPU, threads, torch, batch,
precision). The same metrics and tag are also written on each finished cell run of that
configuration, so MLflow's own charts plot them beside ``val_top1``. Different targets sit side
by side; measuring the same target again replaces its numbers: the value is logged again at
step 0, and MLflow's value of a metric is its latest (its history keeps the earlier ones).
A configuration measured before it was ever trained has its latency run already.

A search may minimise a latency (``objectives: [{metric: latency:cpu, direction: minimize}]``):
the worker measures each trial right after building it (:func:`measure_objectives`) and records
the value under the target named as the objective (``latency_ms.cpu``).

This module imports torch only where it measures (its imports marked ``# lazy:``): ``ablate
report`` and :mod:`ablate.cost_axis` import it for the metric names.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from mlflow.entities import Param

from ablate import memory, names, tracking
from ablate.config import flat_params
from ablate.devices import usable_cpus
from ablate.errors import AblateError
from ablate.locks import retry_busy
from ablate.models import zoo
from ablate.spec import SpecArgs
from ablate.tracking import CellRun, param_text
from ablate.urls import display_url

#: metric prefixes, each followed by ``.<target>``
LATENCY = "latency_ms"          # median latency per image, milliseconds
LATENCY_P25 = "latency_ms_p25"  # 25th percentile
LATENCY_P75 = "latency_ms_p75"  # 75th percentile
THROUGHPUT = "throughput"       # images per second at the measured batch
METRICS = (LATENCY, LATENCY_P25, LATENCY_P75, THROUGHPUT)
#: a search objective ``latency:<target>`` is the metric ``latency_ms.<target>``
OBJECTIVE_PREFIX = "latency:"
#: device kinds a measurement (and a search objective) may name
DEVICE_KINDS = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16")

WARMUP_REPEATS = 3
WARMUP_SECONDS = 0.25
MIN_REPEATS = 10
MAX_REPEATS = 10_000
#: an interquartile range wider than this factor is called noisy in the command's output
NOISY = 2.0
#: how long the timed passes of one configuration last at least (``--seconds``)
DEFAULT_SECONDS = 1.0
#: ... and for a search objective, measured before each trial trains
OBJECTIVE_SECONDS = 0.5

#: the most ``--seconds`` of timed passes per configuration (an hour; the passes stop at MAX_REPEATS anyway)
MAX_SECONDS = 3600.0
#: the largest ``--batch`` whatever the memory: per-image throughput saturates long before (a GPU is
#: busy from a few hundred images), and 2**16 images of 224 px are 39 GB of input alone
MAX_BATCH = 65536

_TARGET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


# ---------------------------------------------------------------- names


def metric(prefix: str, target: str) -> str:
    """``latency_ms.cpu-amd-epyc-t2``: a metric of one target."""
    return f"{prefix}.{target}"


def objective_metric(objective: str) -> str:
    """The MLflow metric behind a search objective: ``latency:cpu`` -> ``latency_ms.cpu``; any
    other objective (``val_top1``, ``macs``) is its own metric."""
    if objective.startswith(OBJECTIVE_PREFIX):
        return metric(LATENCY, objective[len(OBJECTIVE_PREFIX):])
    return objective


def machine_tag(target: str) -> str:
    """``ablate.latency.<target>.machine``: what the target's numbers were measured on."""
    return f"{names.LATENCY_PREFIX}{target}.machine"


def check_target(target: str, option: str = "--target") -> str:
    if not _TARGET.match(target or ""):
        raise AblateError(f"{option}: {target!r} is not a target name (allowed: letters, digits, '-', '_' and '.', "
                          "starting with a letter or digit, e.g. cpu-laptop or cuda-a100)")
    return target


def targets_in(metric_names: Sequence[str]) -> list[str]:
    """The targets of the ``latency_ms.<target>`` metrics among ``metric_names``, sorted."""
    prefix = LATENCY + "."
    return sorted({m[len(prefix):] for m in metric_names if m.startswith(prefix)})


def slug(text: str) -> str:
    """``Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz`` -> ``intel-xeon-platinum-8375c``;
    ``NVIDIA H200`` -> ``h200``: lower case, the trademark signs, clock and filler words dropped."""
    text = re.sub(r"\((r|tm|c)\)|®|™", " ", text.lower())
    text = re.sub(r"@.*$|\b\d+-core\b", " ", text)
    words = [w for w in re.split(r"[^a-z0-9]+", text)
             if w and w not in ("cpu", "processor", "nvidia", "graphics", "core", "with", "radeon")]
    return "-".join(words)[:40].strip("-") or "unknown"


# ---------------------------------------------------------------- the options


def check_options(*, batch: int = 1, threads: Optional[int] = None, seconds: float = DEFAULT_SECONDS,
                  precision: str = "fp32", target: Optional[str] = None) -> None:
    """Refuse (one-line :class:`AblateError`) a ``--batch``, ``--threads``, ``--seconds``,
    ``--precision`` or ``--target`` that cannot be measured, before torch is imported or a thread
    started: a batch beyond :data:`MAX_BATCH`, more threads than the CPUs this process may use, a
    time that is not a finite number of seconds in (0, :data:`MAX_SECONDS`]."""
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise AblateError(f"--batch: {batch!r} (allowed: an integer from 1 to {MAX_BATCH}, and what the "
                          "device's memory holds)")
    if threads is not None:
        cpus = usable_cpus()
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
            raise AblateError(f"--threads: {threads!r} (allowed: an integer from 1 to {cpus}, the CPUs this "
                              "process may use)")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or not 0 < seconds <= MAX_SECONDS:
        raise AblateError(f"--seconds: {seconds!r} (allowed: a number of seconds above 0 and at most "
                          f"{MAX_SECONDS:g})")
    if precision not in PRECISIONS:
        raise AblateError(f"--precision: {precision!r} (allowed: {', '.join(PRECISIONS)})")
    if target is not None:
        check_target(target)


def forward_bytes(model_cfg, num_classes: int, precision: str = "fp32", device_type: str = "cpu") -> tuple[int, int]:
    """(bytes per image, fixed bytes) that one inference pass of a model needs at most: per image
    its input (fp32) and, for S²-MLP, what autograd would keep of the patch embedding, ONE block and
    the head in training (an inference pass holds one block's tensors at a time, and no more than
    training keeps of them); for a timm model, all that training keeps (counted: an upper bound);
    fixed, the weights in fp32."""
    m = model_cfg
    image = 4 * m.in_chans * m.image_size ** 2
    if m.timm is None:
        one_block = m.model_copy(update={"depth": 1})
        per_image = memory.activation_bytes(one_block, precision, device_type=device_type)
    else:
        per_image = zoo.activation_bytes(m, num_classes, precision)
    return image + per_image, 4 * zoo.model_cost(m, num_classes).params


def device_memory(device) -> tuple[int, str]:
    """(bytes, what they are) of the memory a measurement on ``device`` (a torch device) may use:
    the GPU's, or this machine's (its cgroup's limit where lower)."""
    if device.type == "cuda":
        import torch  # lazy: torch; ablate report imports this module for the metric names
        name = torch.cuda.get_device_name(device)
        return torch.cuda.get_device_properties(device).total_memory, f"the memory of {name}"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < total:
            return int(limit), "this process's memory limit"
    return total, "this machine's memory"


def check_batch_memory(configs: Sequence[Any], batch: int, precision: str, device) -> None:
    """Refuse a ``--batch`` whose forward pass (:func:`forward_bytes`) would not fit the memory of
    ``device`` for one of ``configs`` (resolved cell configurations), before any is built."""
    total, where = device_memory(device)
    worst, seen = None, set()
    for cfg in configs:
        model = (cfg.model.model_dump_json(), cfg.num_classes or 1000)
        if model in seen:  # seeds and training settings share a model
            continue
        seen.add(model)
        per_image, fixed = forward_bytes(cfg.model, cfg.num_classes or 1000, precision, device.type)
        fits = max(0, (total - fixed) // per_image)
        if worst is None or fits < worst[0]:
            worst = (fits, per_image, fixed, cfg)
    if worst is None or batch <= worst[0]:
        return
    fits, per_image, fixed, cfg = worst
    shape = f"{cfg.model.timm} at {cfg.model.image_size} px" if cfg.model.timm else (
        f"width {cfg.model.width}, {cfg.model.image_size} px, patch {cfg.model.patch_size}")
    raise AblateError(f"--batch: {batch} needs about {(fixed + batch * per_image) / 1e9:.3g} GB for one forward "
                      f"pass ({shape}: {per_image / 1e6:.3g} MB per image, estimated) and {where} is "
                      f"{total / 1e9:.3g} GB (allowed: at most {fits} for this spec on {device})")


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")) and ":" in line:
                name = line.split(":", 1)[1].strip()
                if name:
                    return re.sub(r"\s+", " ", name)
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


@dataclass(frozen=True)
class Machine:
    """What a measurement ran on: the device kind and name, CPU threads, torch, batch, precision."""
    kind: str        # cpu | cuda
    name: str        # the CPU model or the GPU's name
    threads: int     # torch's intra-op CPU threads
    torch: str
    batch: int = 1
    precision: str = "fp32"

    @property
    def target(self) -> str:
        """``cpu-<cpu>-t<threads>`` or ``cuda-<gpu>``, then ``-b<batch>`` and ``-bf16`` where not 1 and fp32."""
        base = f"cpu-{slug(self.name)}-t{self.threads}" if self.kind == "cpu" else f"cuda-{slug(self.name)}"
        return base + (f"-b{self.batch}" if self.batch != 1 else "") + (
            f"-{self.precision}" if self.precision != "fp32" else "")

    @property
    def description(self) -> str:
        device = f"CPU {self.name}" if self.kind == "cpu" else f"GPU {self.name} (CPU {cpu_model()})"
        return (f"{device}, {self.threads} thread{'s' * (self.threads != 1)}, torch {self.torch}, "
                f"batch {self.batch}, {self.precision}")


def this_machine(device: Any, batch: int = 1, precision: str = "fp32") -> Machine:
    """The :class:`Machine` of a torch ``device`` of this process, at its current thread count."""
    import torch  # lazy: torch; ablate report imports this module for the metric names
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return Machine(device.type, name, torch.get_num_threads(), torch.__version__.split("+")[0], batch, precision)


def resolve_device(device: str):
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device this machine has (one-line error otherwise)."""
    import torch  # lazy: torch; ablate report imports this module for the metric names
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AblateError(f"--device: {device!r} is not a device (allowed: cpu, cuda, cuda:N)") from None
    if dev.type not in DEVICE_KINDS:
        raise AblateError(f"--device: {device!r} (allowed: cpu, cuda, cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AblateError(f"--device: {device}: CUDA is not available on this machine (allowed: cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AblateError(f"--device: {device}: this machine has {torch.cuda.device_count()} GPU(s)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# ---------------------------------------------------------------- timing


@dataclass
class Measurement:
    """Timed forward passes of one model: seconds per pass (each one timed on its own)."""
    batch: int
    seconds: list[float]
    warmup: int = 0

    def _per_image_ms(self, q: float) -> float:
        xs = sorted(self.seconds)
        if len(xs) == 1:
            return xs[0] * 1e3 / self.batch
        pos = q * (len(xs) - 1)  # linear interpolation between order statistics (numpy's default)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return (xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)) * 1e3 / self.batch

    @property
    def repeats(self) -> int:
        return len(self.seconds)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1e3 / self.batch

    @property
    def p25_ms(self) -> float:
        return self._per_image_ms(0.25)

    @property
    def p75_ms(self) -> float:
        return self._per_image_ms(0.75)

    @property
    def min_ms(self) -> float:
        return min(self.seconds) * 1e3 / self.batch

    @property
    def max_ms(self) -> float:
        return max(self.seconds) * 1e3 / self.batch

    @property
    def throughput(self) -> float:
        """Images per second at this batch."""
        return self.batch / statistics.median(self.seconds)

    @property
    def noisy(self) -> bool:
        """The middle half of the passes spans more than a factor of :data:`NOISY`: something else
        ran on the device meanwhile (or more threads than free cores)."""
        return self.p75_ms > NOISY * self.p25_ms

    def metrics(self, target: str) -> dict[str, float]:
        return {metric(LATENCY, target): self.median_ms, metric(LATENCY_P25, target): self.p25_ms,
                metric(LATENCY_P75, target): self.p75_ms, metric(THROUGHPUT, target): self.throughput}

    def summary(self) -> str:
        return (f"{self.median_ms:.4g} ms/image (IQR {self.p25_ms:.4g}-{self.p75_ms:.4g}, min {self.min_ms:.4g}, "
                f"max {self.max_ms:.4g}; {self.repeats} passes), {self.throughput:.4g} images/s")


def time_forward(model, example, *, precision: str = "fp32", seconds: float = DEFAULT_SECONDS,
                 min_repeats: int = MIN_REPEATS, warmup_seconds: float = WARMUP_SECONDS,
                 warmup_repeats: int = WARMUP_REPEATS) -> Measurement:
    """Time ``model(example)`` as :mod:`ablate.latency` describes: eval mode, inference mode,
    a warm-up, then at least ``min_repeats`` passes and ``seconds`` of them, each timed alone."""
    import torch  # lazy: torch; ablate report imports this module for the metric names
    device = example.device
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    model.eval()
    times: list[float] = []
    with torch.inference_mode(), autocast:
        warm, start = 0, time.perf_counter()
        while warm < warmup_repeats or (time.perf_counter() - start < warmup_seconds and warm < MAX_REPEATS):
            model(example)
            sync()
            warm += 1
        total = 0.0
        while len(times) < min_repeats or (total < seconds and len(times) < MAX_REPEATS):
            sync()
            t0 = time.perf_counter()
            model(example)
            sync()
            dt = time.perf_counter() - t0
            times.append(dt)
            total += dt
    return Measurement(example.shape[0], times, warm)


def measure_config(cfg, device, *, batch: int = 1, precision: str = "fp32", seconds: float = DEFAULT_SECONDS,
                   num_classes: Optional[int] = None) -> Measurement:
    """Build ``cfg``'s model (random weights, no data) on ``device`` and time it on a random batch."""
    import torch  # lazy: torch; ablate report imports this module for the metric names

    from ablate.models.zoo import build_model  # lazy: torch and timm, as torch
    torch.manual_seed(0)
    classes = num_classes if num_classes is not None else (cfg.num_classes or 1000)
    model = build_model(cfg.model, classes).to(device)
    m = cfg.model
    example = torch.randn(batch, m.in_chans, m.image_size, m.image_size, device=device)
    try:
        return time_forward(model, example, precision=precision, seconds=seconds)
    finally:
        del model, example
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- configurations


def logged_params(cfg) -> dict[str, str]:
    """``cfg``'s flat params as a cell run logs them (the same text, so that keys agree)."""
    return {k: param_text(v) for k, v in flat_params(cfg).items()}


@dataclass
class Configuration:
    """One configuration to measure: its key, resolved config, what tells it apart, and its runs."""
    key: str
    config: Any
    params: dict[str, str]
    label: str
    cell_runs: list[str] = field(default_factory=list)   # finished cell runs (every seed)
    latency_run: Optional[str] = None
    measurement: Optional[Measurement] = None


def _label(params: Mapping[str, str], varied: Sequence[str]) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={params.get(k, '')}" for k in varied if k != names.SEED) or "the configuration"


def configurations(spec, experiment_id: Optional[str]) -> list[Configuration]:
    """A grid's configurations (its cells, seeds merged), or a search's finished trials, each
    with its finished cell runs and its latency run when the experiment has them."""
    runs = tracking.all_runs(experiment_id) if experiment_id is not None else []
    cells = [r for r in runs if r.data.tags.get(names.ROLE) == "cell" and r.info.status == "FINISHED"
             and r.data.tags.get(names.STATE) == "COMPLETE"]
    found: dict[str, Configuration] = {}
    if spec.search is None:
        for cell in spec.cells():
            params = logged_params(cell.config)
            key = tracking.configuration_key(params)
            if key not in found:
                found[key] = Configuration(key, cell.config, tracking.run_configuration(params),
                                           _label(params, spec.varied))
    else:
        for run in sorted(cells, key=lambda r: int(r.data.tags.get(names.TRIAL_NUMBER) or 0)):
            params = dict(run.data.params)
            key = tracking.configuration_key(params)
            if key not in found:
                found[key] = Configuration(key, tracking.config_from_params(params), tracking.run_configuration(params),
                                           _label(params, spec.varied))
    for run in cells:
        conf = found.get(tracking.configuration_key(run.data.params))
        if conf is not None:
            conf.cell_runs.append(run.info.run_id)
    for run in runs:
        if run.data.tags.get(names.ROLE) == names.ROLE_LATENCY:
            conf = found.get(run.data.tags.get(names.CONFIG_KEY, ""))
            if conf is not None and conf.latency_run is None:
                conf.latency_run = run.info.run_id
    return list(found.values())


# ---------------------------------------------------------------- recording


def _latency_run(client, experiment_id: str, conf: Configuration, spec_file: str, spec) -> str:
    """The configuration's latency run: found by its key, else created with its params."""
    if conf.latency_run is not None:
        return conf.latency_run
    tags = {names.ROLE: names.ROLE_LATENCY, names.CONFIG_KEY: conf.key, names.SPEC_FILE: spec_file,
            names.VARIED: json.dumps(sorted(spec.varied)), names.GIT_COMMIT: tracking.git_commit(),
            **tracking.spec_tags(spec)}
    run = retry_busy(client.create_run, experiment_id, tags=tags, run_name=f"latency {conf.label}",
                     what="the MLflow store")
    params = [Param(k, v) for k, v in conf.params.items()]
    for i in range(0, len(params), 100):
        retry_busy(client.log_batch, run.info.run_id, params=params[i:i + 100], what="the MLflow store")
    tracking.finish_run(run.info.run_id)
    conf.latency_run = run.info.run_id
    return conf.latency_run


def record(run_ids: Sequence[str], target: str, measurement: Measurement, machine: str,
           extra: Optional[Mapping[str, float]] = None) -> None:
    """Log one target's numbers on each run (a configuration's latency run and its cell runs):
    the metrics at step 0, so that a new measurement of the target replaces the old value."""
    values = {**measurement.metrics(target), **(extra or {})}
    for run_id in run_ids:
        run = CellRun(run_id, resumed=False)
        run.log_metrics(values, step=0)
        run.set_tags({machine_tag(target): machine})


@dataclass
class LatencyResult:
    """What :func:`measure_spec` measured and where it recorded it."""
    experiment: str
    store: str
    target: str
    machine: str
    configurations: list[Configuration]
    created: int = 0  # latency runs created now (configurations measured for the first time)
    seconds: float = 0.0

    @property
    def cell_runs(self) -> int:
        return sum(len(c.cell_runs) for c in self.configurations)


def measure_spec(spec_path: str, *, device: str = "cpu", batch: int = 1, threads: Optional[int] = None,
                 precision: str = "fp32", target: Optional[str] = None, seconds: float = DEFAULT_SECONDS,
                 spec_args: Any = None, echo: Callable[[str], None] = lambda s: None) -> LatencyResult:
    """``ablate latency``: measure every configuration of a spec (a search: of its finished trials)
    on ``device`` and record the numbers in the spec's MLflow experiment under ``target`` (default:
    derived from this machine)."""
    check_options(batch=batch, threads=threads, seconds=seconds, precision=precision, target=target)
    spec = (spec_args or SpecArgs()).load(spec_path, check_paths=False)  # no data is read
    import torch  # lazy: torch; ablate report imports this module for the metric names
    dev = resolve_device(device)
    if spec.search is None:  # a grid's configurations are known before anything is written
        check_batch_memory([cell.config for cell in spec.cells()], batch, precision, dev)
    if threads is not None:
        torch.set_num_threads(threads)
    machine = this_machine(dev, batch, precision)
    target = target or machine.target
    started = time.perf_counter()
    experiment_id = tracking.ensure_experiment(spec.name, spec)
    client = tracking.client()
    confs = configurations(spec, experiment_id)
    if not confs:
        raise AblateError(f"{spec_path}: search {spec.name!r} has no finished trials in "
                          f"{display_url(tracking.tracking_uri())} yet (allowed: measure after `ablate search`)")
    if spec.search is not None:  # a search's, once its finished trials are read
        check_batch_memory([c.config for c in confs], batch, precision, dev)
    echo(f"{spec.name}: {len(confs)} configuration{'s' * (len(confs) != 1)} on target {target} "
         f"({machine.description})")
    created = 0
    for conf in confs:
        conf.measurement = measure_config(conf.config, dev, batch=batch, precision=precision, seconds=seconds)
        created += conf.latency_run is None
        run_id = _latency_run(client, experiment_id, conf, spec_path, spec)
        record([run_id, *conf.cell_runs], target, conf.measurement, machine.description)
        echo(f"  {conf.label}: {conf.measurement.summary()}" + ("  [noisy]" if conf.measurement.noisy else ""))
    noisy = sum(c.measurement.noisy for c in confs)
    if noisy:
        echo(f"{noisy} noisy measurement{'s' * (noisy != 1)} (IQR wider than {NOISY:g}x): other work ran on the "
             f"device meanwhile{', or --threads exceeds the free cores' if dev.type == 'cpu' else ''}; measure again "
             "on an idle machine (the new numbers replace these)")
    return LatencyResult(spec.name, display_url(tracking.tracking_uri()), target, machine.description, confs,
                         created, time.perf_counter() - started)


# ---------------------------------------------------------------- a search objective


def latency_objectives(spec) -> list[str]:
    """The ``latency:<kind>`` objectives of a search spec."""
    search = getattr(spec, "search", None)
    return [o.metric for o in (search.objectives if search is not None else [])
            if o.metric.startswith(OBJECTIVE_PREFIX)]


def measure_objectives(spec, cfg, device=None, run=None, *, seconds: float = OBJECTIVE_SECONDS) -> dict[str, float]:
    """For a search trial, right after its configuration is built and before it trains: measure
    each ``latency:<kind>`` objective of ``spec`` (``cpu``: on this machine's CPU at its current
    thread count; ``cuda``: on the worker's GPU, else the first one) at batch 1 in fp32, log the
    numbers on the trial's MLflow ``run`` (a :class:`~ablate.tracking.CellRun`) under the
    objective's name as target, and return ``{metric: value}`` (``latency_ms.cpu``: ms per image)
    for the objective values. Empty when the spec has no such objective."""
    wanted = latency_objectives(spec)
    if not wanted:
        return {}
    import torch  # lazy: torch; ablate report imports this module for the metric names
    out: dict[str, float] = {}
    for objective in wanted:
        target = objective[len(OBJECTIVE_PREFIX):]
        given = torch.device(device) if device is not None else torch.device("cpu")
        if target == "cuda" and given.type != "cuda" and not torch.cuda.is_available():
            raise AblateError(f"objective {objective}: CUDA is not available on this machine "
                              "(allowed: latency:cpu, or run the search where there is a GPU)")
        dev = given if given.type == target else resolve_device(target)
        m = measure_config(cfg, dev, seconds=seconds)
        if run is not None:
            run.log_metrics(m.metrics(target), step=0)
            run.set_tags({machine_tag(target): this_machine(dev).description})
        out.update(m.metrics(target))
    return out

"""The ``ablate`` command line: parse, call a plain function, print.

Every command's work is a function in the package that tests call directly; here we only
translate options and turn :class:`~ablate.errors.AblateError` into a one-line message and
exit status 2. Each command imports its own modules inside its function (``# lazy: per
command``): ``ablate --help``, ``plan`` and ``status`` never pay for torch, timm or the stores of
the others.
"""
from __future__ import annotations

import contextlib
import functools
import sys

import click

from ablate import __version__, names
from ablate.errors import AblateError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AblateError as e:
            for line in str(e).splitlines():
                # a name from a command line may hold bytes that are not UTF-8: shown escaped, never a traceback
                click.echo(f"error: {line}".encode("utf-8", "backslashreplace").decode("utf-8"), err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ablate")
def cli():
    """Ablation studies of the S²-MLP vision model: grids and searches from YAML specs,
    trained on ImageNet100 or embedded data, recorded in MLflow."""


def main():
    cli()


# ---- commands (one section each; keep each command's logic in its own module) ----


# ---- spec options (plan, run, search, status, report) ---------------------------------------

def spec_options(command):
    """``--set KEY=VALUE`` (repeatable), ``--name`` and ``--max-cells`` for a command that loads a
    spec; the command receives them as one ``spec_args`` (:class:`ablate.spec.SpecArgs`) and loads
    its spec with ``spec_args.load(path)``, so that every command reads the same spec alike."""
    @functools.wraps(command)
    def with_spec_args(*args, overrides, experiment_name, max_cells, **kwargs):
        from ablate.spec import MAX_CELLS, SpecArgs  # lazy: per command
        spec_args = SpecArgs(tuple(overrides), experiment_name, max_cells or MAX_CELLS)
        return command(*args, spec_args=spec_args, **kwargs)

    for option in reversed([
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="override a setting of the spec, e.g. --set model.width=64 --set train.epochs=1 "
                     "(repeatable; any data.*, model.*, train.* setting or seeds; YAML values: "
                     "\"model.shift=[[0,1],[0,-1]]\", train.randaugment=null). Runs with overrides record "
                     "into their own experiment, <name>+<hash of the overrides>; machine-local settings "
                     "(data.root, data.workers, train.micro_batch, ...) change no experiment and no cell"),
        click.option("--name", "experiment_name", default=None,
                     help="MLflow experiment (and ledger study) to record into instead of the spec's name "
                     "(or of <name>+<hash> with --set of settings that are not machine-local)"),
        click.option("--max-cells", type=click.IntRange(min=1), default=None,
                     help="refuse a grid of more cells than this (default 100,000), counted before any is built"),
    ]):
        with_spec_args = option(with_spec_args)
    return with_spec_args


# ---- launchers (--launcher slurm), status, cancel ---------------------------------------------

_launcher_options = [
    click.option("--launcher", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
                 help="where the workers run: processes on this machine, or the tasks of one Slurm job "
                 "array (one task per worker; returns once submitted)"),
    click.option("--slurm", multiple=True, metavar="KEY=VALUE",
                 help="a Slurm setting, over the profile's (repeatable): partition, account, qos, time, "
                 "gpus_per_task, cpus_per_task, mem, constraint, nodelist, exclude, max_running, sbatch, "
                 "setup, logs; see docs/scaling.md"),
    click.option("--slurm-profile", type=click.Path(dir_okay=False), default=None,
                 help="a cluster profile: YAML of the --slurm keys that a lab writes once "
                 "(default: $ABLATE_SLURM_PROFILE)"),
    click.option("--follow", is_flag=True,
                 help="with --launcher slurm: stay and show progress until every cell is done "
                 "(Ctrl-C stops following, never the jobs)"),
]


def _with_launcher_options(f):
    for option in reversed(_launcher_options):
        f = option(f)
    return f


def _launcher(launcher, slurm, slurm_profile, follow, devices) -> bool:
    """True for --launcher slurm; refuses the Slurm options without it."""
    if launcher == "slurm":
        if devices:
            raise AblateError("--devices: not with --launcher slurm (allowed: --slurm gpus_per_task=N, one "
                              "worker per GPU of each task)")
        return True
    for name, given in (("--slurm", slurm), ("--slurm-profile", slurm_profile), ("--follow", follow)):
        if given:
            raise AblateError(f"{name}: only with --launcher slurm (allowed: add --launcher slurm)")
    return False


def _launch_slurm(spec, kind, *, workers, storage, device, checkpoints, slurm, slurm_profile, follow, spec_args,
                  trials=None, gpus_per_cell=1, reuse=True):
    from ablate.launch.settings import load_settings  # lazy: per command
    from ablate.launch.slurm import launch  # lazy: per command
    from ablate.urls import display_url, storage_option  # lazy: per command
    settings = load_settings(slurm, slurm_profile)
    done = launch(spec, kind=kind, workers=workers, storage=storage, checkpoints=checkpoints, device=device,
                  settings=settings, trials=trials, spec_args=spec_args, gpus_per_cell=gpus_per_cell, reuse=reuse)
    job, stores = done.launch, done.stores
    status = spec_args.command("status", spec, *storage_option(storage))
    click.echo(f"{done.spec_name}: {done.queued}; ledger {display_url(stores.ledger)}; "
               f"MLflow {display_url(stores.tracking)}; checkpoints {stores.checkpoints}")
    if job is None:
        click.echo(f"nothing to launch: every {'cell' if kind == 'grid' else 'trial'} has finished ({status})")
        return
    click.echo(f"submitted Slurm job {job.job}: {job.tasks} task(s), {done.request}")
    click.echo(f"logs: {job.logs}")
    click.echo(f"follow: {status}    stop: {spec_args.command('cancel', spec, *storage_option(storage))}")
    if not follow:
        return
    from ablate.status import follow as follow_status  # lazy: per command
    try:
        final = follow_status(spec, job, storage=storage, echo=click.echo, spec_args=spec_args)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; Slurm job {job.job} goes on: {status}")
        return
    click.echo(final.to_text())
    if final.counts["finished"]:
        click.echo(f"next: {spec_args.command('report', spec)}")
    sys.exit(0 if final.done and not final.counts["failed"] else 1)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the status as JSON (every cell)")
@click.option("--all", "every_cell", is_flag=True,
              help="a row for every cell, also past 50 (by default: those running, interrupted or failed)")
@click.option("--storage", default=None, help="ledger storage URL (default: $ABLATE_STORAGE or "
              "sqlite:///ablate-ledger.db)")
@spec_options
def status(spec, as_json, every_cell, storage, spec_args):
    """Where SPEC's grid or search stands: the cells' states, counts, elapsed time, ETA and its
    Slurm jobs. Reads the ledger, MLflow and Slurm; writes nothing."""
    from ablate.status import collect  # lazy: per command
    result = collect(spec, storage, spec_args=spec_args)
    click.echo(result.to_json() if as_json else result.to_text(every_cell=every_cell))


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--storage", default=None, help="ledger storage URL (default: $ABLATE_STORAGE or "
              "sqlite:///ablate-ledger.db)")
@spec_options
def cancel(spec, storage, spec_args):
    """Cancel SPEC's Slurm jobs (scancel); unfinished cells resume from their checkpoints at the next launch."""
    from ablate.launch.cancel import cancel as cancel_spec  # lazy: per command
    from ablate.urls import storage_option  # lazy: per command
    result = cancel_spec(spec, storage, spec_args=spec_args)
    if not result.launches:
        click.echo(f"{spec}: no Slurm job of this spec is queued or running")
        return
    jobs = ", ".join(f"{r.job} ({r.tasks} task(s))" for r in result.launches)
    click.echo(f"cancelled Slurm job(s) {jobs}")
    if result.still_ending:
        click.echo(f"still ending: {', '.join(result.still_ending)} (Slurm has not stopped them yet)")
    if result.released:
        click.echo(f"{len(result.released)} running cell(s) queued again, to resume from their checkpoints")
    verb = "search" if result.launches[-1].kind == names.SEARCH else "run"
    again = spec_args.command(verb, spec, "--launcher", "slurm", *result.launches[-1].options, *storage_option(storage))
    click.echo(f"the next launch finishes the rest: {again}")


# ---- run / search ----------------------------------------------------------------------------

@contextlib.contextmanager
def _resumable(kind: str):
    """Ctrl-C or SIGTERM during a local run or search: the workers are stopped and the parent run
    marked KILLED below; here say that a re-run resumes, and exit 130 (SIGINT) or 143 (SIGTERM)."""
    from ablate.lifecycle import exit_status, sigterm_as_interrupt  # lazy: per command
    try:
        with sigterm_as_interrupt():
            yield
    except KeyboardInterrupt as e:
        import signal  # lazy: per command
        status = exit_status(e)
        what = "cells" if kind == names.GRID else "trials"
        click.echo(f"\nstopped ({signal.Signals(status - 128).name}): unfinished {what} stay "
                   f"in the ledger; run the same command again to resume them from their last checkpoints",
                   err=True)
        sys.exit(status)


def _devices(value: str | None) -> list[str]:
    if value is None:
        return []
    items = [v.strip() for v in value.split(",")]
    if not all(v.isdigit() for v in items):  # also refuses "", ",,," and "0,,1"
        raise AblateError(f"--devices: {value!r} (allowed: comma-separated CUDA device numbers, e.g. 0,1,2,3)")
    return [f"cuda:{int(v)}" for v in items]


_worker_options = [
    click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
                 help="worker processes on this machine (each trains one cell at a time)"),
    click.option("--storage", default=None, help="ledger storage URL (default: $ABLATE_STORAGE or "
                 "sqlite:///ablate-ledger.db); postgresql://... to share work between machines"),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N"),
    click.option("--devices", default=None, help="one worker per listed GPU, e.g. 0,1,2,3 (overrides --workers)"),
    click.option("--gpus-per-cell", default=1, show_default=True, type=click.IntRange(min=1),
                 help="processes that train one cell together (torch.distributed): GPUs of --devices per cell, "
                 "or CPU processes with --device cpu"),
    click.option("--checkpoints", default=None, help="checkpoint folder, shared by all workers of a grid "
                 "(default: $ABLATE_CHECKPOINTS or ./checkpoints)"),
    click.option("--no-reuse", is_flag=True, help="train a cell even where another spec finished the same "
                 "configuration in these stores (by default its run is recorded here, not trained again)"),
]


def _with_worker_options(f):
    for option in reversed(_worker_options):
        f = option(f)
    return f


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@_with_worker_options
@click.option("--close-orphans", is_flag=True, help="close the cells no longer in the spec that were left "
              "unfinished: their MLflow runs marked KILLED, their ledger trials failed, their checkpoints removed "
              "(a terminal is asked, default no)")
@spec_options
@_with_launcher_options
def run(spec, workers, storage, device, devices, gpus_per_cell, checkpoints, no_reuse, close_orphans, spec_args,
        launcher, slurm, slurm_profile, follow):
    """Train every cell of SPEC's grid once; re-running resumes and skips finished cells.

    With --launcher slurm the workers are the tasks of one Slurm job array (--workers N tasks)
    and the command returns once it is submitted (or, with --follow, once every cell is done).
    """
    if close_orphans and launcher == "slurm":
        raise AblateError("--close-orphans: closes cells no longer in the spec before a local run (allowed: "
                          f"without --launcher slurm: `ablate run {spec} --close-orphans` once, then the launch)")
    if _launcher(launcher, slurm, slurm_profile, follow, devices):
        _launch_slurm(spec, names.GRID, workers=workers, storage=storage, device=device, checkpoints=checkpoints,
                      slurm=slurm, slurm_profile=slurm_profile, follow=follow, spec_args=spec_args,
                      gpus_per_cell=gpus_per_cell, reuse=not no_reuse)
        return
    from ablate.runner import run_grid  # lazy: per command
    from ablate.summary import print_summary  # lazy: per command
    with _resumable(names.GRID):
        terminal = sys.stdin.isatty() and sys.stdout.isatty()  # elsewhere one line says how, never a question
        outcome = run_grid(spec, workers=workers, storage=storage, device=device, devices=_devices(devices),
                           checkpoints=checkpoints, spec_args=spec_args, gpus_per_cell=gpus_per_cell,
                           close_orphans=close_orphans, reuse=not no_reuse,
                           ask=functools.partial(click.confirm, default=False) if terminal else None)
    print_summary(outcome, spec, spec_args)
    sys.exit(0 if outcome.ok else 1)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--trials", default=None, type=int, help="total trials the study should hold (default: the spec's)")
@_with_worker_options
@spec_options
@_with_launcher_options
def search(spec, trials, workers, storage, device, devices, gpus_per_cell, checkpoints, no_reuse, spec_args, launcher,
           slurm, slurm_profile, follow):
    """Run SPEC's Optuna search up to its number of trials; re-running continues the same study."""
    if _launcher(launcher, slurm, slurm_profile, follow, devices):
        _launch_slurm(spec, names.SEARCH, workers=workers, storage=storage, device=device, checkpoints=checkpoints,
                      slurm=slurm, slurm_profile=slurm_profile, follow=follow, trials=trials, spec_args=spec_args,
                      gpus_per_cell=gpus_per_cell, reuse=not no_reuse)
        return
    from ablate.runner import run_search  # lazy: per command
    from ablate.summary import print_search_summary  # lazy: per command
    with _resumable(names.SEARCH):
        outcome = run_search(spec, trials=trials, workers=workers, storage=storage, device=device,
                             devices=_devices(devices), checkpoints=checkpoints, spec_args=spec_args,
                             gpus_per_cell=gpus_per_cell, reuse=not no_reuse)
    counts = outcome.progress.counts
    click.echo("trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    print_search_summary(outcome, spec, spec_args)


# ---- report ----------------------------------------------------------------------------------

@cli.command()
@click.argument("target", metavar="SPEC_OR_EXPERIMENT")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="output folder (default: reports/<name> under the working directory)")
@click.option("--cost", default="macs", show_default=True, metavar="macs|params|latency:TARGET|gpu_hours",
              help="the cost axis of the top-1 figure and its Pareto front: MACs per image, parameters, the "
              "latency `ablate latency` measured on TARGET (it prints the name), or the device-hours of training")
@spec_options
def report(target, out, cost, spec_args):
    """Tables and plots of an experiment's finished runs, read from MLflow, into reports/<name>/.

    With --set (or --name), the report of the runs made with those same options. With
    --cost latency:TARGET, also a figure of the measured latency against MACs and their rank
    correlation."""
    from ablate.report import write_report  # lazy: per command
    from ablate.stores import existing_tracking_store  # lazy: per command
    options = (("--out", out) if out else ()) + (("--cost", cost) if cost != "macs" else ())
    command = spec_args.command("report", target, *options)
    try:
        existing_tracking_store()  # a folder with no runs: say so, without creating an empty mlflow.db
        rep = write_report(target, out, command=command, spec_args=spec_args, cost=cost)
    except AblateError as e:
        first = _run_first(target, spec_args, e)
        if first is None:
            raise
        head, allowed, rest = str(e).partition(" (allowed: ")
        raise AblateError(f"{head}; run it first: {first}{allowed}{rest}") from None
    runs = rep.counts["finished"]
    click.echo(f"{rep.experiment}: {runs} runs in {len(rep.rows)} configuration{'s' * (len(rep.rows) != 1)} -> "
               + ", ".join(str(p) for p in rep.files))
    if rep.correlation is not None:
        click.echo(rep.correlation.text())
    if rep.parent_run_id:
        click.echo(f"logged under report/ of MLflow run {rep.parent_run_id} ({rep.store})")


def _run_first(target: str, spec_args, error: AblateError):
    """The command that records what ``ablate report SPEC`` found nothing of (``ablate run SPEC``,
    or ``ablate search SPEC``, with the same ``--set``/``--name``), or ``None``: where ``error``
    is no store here, or a store without the experiment of that spec with those options. A
    report of an experiment name, a spec with a problem, or an experiment whose runs have not
    finished get the error as it is."""
    from pathlib import Path  # lazy: per command
    from ablate.errors import SpecError  # lazy: per command
    from ablate.stores import NothingRecorded  # lazy: per command
    from ablate.tracking import existing_experiment  # lazy: per command
    if isinstance(error, SpecError) or not Path(target).is_file():
        return None
    try:
        spec = spec_args.load(target, check_paths=False)
        if not isinstance(error, NothingRecorded) and existing_experiment(spec.name) is not None:
            return None
    except AblateError:
        return None
    return spec_args.command("search" if spec.search is not None else "run", target)


# ---- models ----------------------------------------------------------------------------------

@cli.command()
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="show the cost of this configuration instead of the registered variants: any "
              "model setting, e.g. --set model.width=384 --set model.depth=6 (repeatable; "
              "unset keys come from --base)")
@click.option("--base", default="s2mlp_wide_16_224", show_default=True,
              help="registered variant whose settings --set starts from")
@click.option("--classes", default=1000, show_default=True, type=click.IntRange(min=0),
              help="classifier outputs (counted in params and MACs, not in the paper columns)")
def models(assignments, base, classes):
    """Registered S²-MLP variants (timm names) with paper-convention params and GMACs.

    params_M is in 10^6 and params_Mi in 2^20 (the paper uses both, see ablate.models.cost);
    both exclude the classifier and norms. GMACs are 10^9 multiply-adds per image.

    \b
    Examples:
      ablate models
      ablate models --set model.width=384 --set model.depth=6
      ablate models --set image_size=112 --set "shift=[[0,1],[0,-1]]"
      ablate models --set token_mixing=mlp
      ablate models --set timm=mixer_b16_224        (counted: c)
    """
    from ablate.models.zoo import model_cost  # lazy: per command
    from ablate.models.listing import (cost_row, format_table,  # lazy: per command
                                       model_config_from_overrides, variant_rows)
    if not assignments and base == "s2mlp_wide_16_224":
        click.echo(format_table(variant_rows(classes)))
        return
    cfg = model_config_from_overrides(assignments, base=base)
    row = cost_row("config", cfg, classes)  # checks a timm name first
    cost = model_cost(cfg, classes)
    click.echo(format_table([row]))
    click.echo(" ".join(f"{k}={v}" for k, v in cost.as_dict().items()))


# ---- latency ---------------------------------------------------------------------------------

@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N: where to measure")
@click.option("--batch", default=1, show_default=True, type=int,
              help="images per forward pass (latency is per image: a pass's time / batch); at most 65536 "
              "and what the device's memory holds for the spec's models")
@click.option("--threads", default=None, type=int,
              help="torch CPU threads, at most the CPUs this process may use (default: torch's, usually one "
              "per physical core)")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]),
              help="bf16: through autocast, as training computes")
@click.option("--target", default=None, metavar="NAME",
              help="record under this target name instead of the one derived from the machine "
              "(cpu-<cpu>-t<threads>, cuda-<gpu>, with -b<batch> and -bf16 where set)")
@click.option("--seconds", default=1.0, show_default=True, type=float,
              help="time each configuration for at least this long (and at least 10 passes), after a warm-up; "
              "above 0, at most 3600")
@spec_options
def latency(spec, device, batch, threads, precision, target, seconds, spec_args):
    """Measure the inference latency of every configuration of SPEC (a search: of its finished
    trials) on this machine, and record it in MLflow against each configuration.

    Builds each model with random weights (no training, no data), warms it up, then times
    forward passes: the median latency per image, its interquartile range, and the throughput.
    Measurements of different targets (a laptop's CPU, a server's GPU) sit side by side;
    measuring the same target again replaces its numbers. See docs/reports.md.

    \b
    Examples:
      ablate latency experiments/quickstart.yaml --device cpu --batch 1
      ablate report experiments/quickstart.yaml --cost latency:<the target it prints>
    """
    from ablate.latency import measure_spec  # lazy: per command
    result = measure_spec(spec, device=device, batch=batch, threads=threads, precision=precision, target=target,
                          seconds=seconds, spec_args=spec_args, echo=click.echo)
    n = len(result.configurations)
    click.echo(f"recorded {n} latenc{'ies' if n != 1 else 'y'} of target {result.target} in MLflow experiment "
               f"{result.experiment} ({result.store}): {n} latency run{'s' * (n != 1)} "
               f"({result.created} new), {result.cell_runs} finished cell run{'s' * (result.cell_runs != 1)}; "
               f"{result.seconds:.0f} s")
    click.echo(f"target: {result.target}")
    click.echo(f"report on this axis: {spec_args.command('report', spec, '--cost', f'latency:{result.target}')}")


# ---- ui --------------------------------------------------------------------------------------

@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="interface to listen on (0.0.0.0 exposes the UI to the network: it then answers requests "
              "addressed to this machine's names and addresses, and to --allowed-hosts)")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535), help="MLflow UI port")
@click.option("--optuna", is_flag=True, help="also start optuna-dashboard on the ledger (needs the dashboard "
              "extra: pip install -e '.[dashboard]')")
@click.option("--optuna-port", default=None, type=click.IntRange(1, 65535),
              help="optuna-dashboard port (default: --port + 1)")
@click.option("--storage", default=None, help="ledger storage URL for --optuna (default: $ABLATE_STORAGE "
              "or sqlite:///ablate-ledger.db)")
@click.option("--allowed-hosts", "allowed_hosts", multiple=True, metavar="HOST[,HOST...]",
              help="more Host headers the MLflow UI answers, e.g. a name it is reached by through a proxy "
              "(mlflow.lab.org, *.lab.org; '*' for any); repeatable")
def ui(host, port, optuna, optuna_port, storage, allowed_hosts):
    """Browse the runs: the MLflow UI on the store the runs use, until Ctrl-C."""
    from ablate.ui import serve  # lazy: per command
    serve(host, port, optuna=optuna, storage=storage, optuna_port=optuna_port, echo=click.echo,
          allowed_hosts=allowed_hosts)


# ---- data ------------------------------------------------------------------------------------

@cli.group()
def data():
    """Prepare datasets: ImageNet100 from ImageNet-1K, and the decode-once uint8 cache."""


@data.command("imagenet100")
@click.option("--imagenet", required=True, type=click.Path(file_okay=False),
              help="ImageNet-1K root: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, with the validation "
              "images already sorted into class folders (as ImageNet's valprep.sh leaves them)")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="new ImageNet100 root; gets train/<wnid>/ and val/<wnid>/ of symbolic links")
@click.option("--force", is_flag=True, help="replace train/ and val/ of a non-empty --out")
def data_imagenet100(imagenet, out, force):
    """Build ImageNet100 (the 100 classes of CMC, Tian et al. 2019; the S²-MLP paper's
    ablation dataset) from an ImageNet-1K tree, as symbolic links: no image is copied.

    \b
    Example:
      ablate data imagenet100 --imagenet /data/imagenet --out /data/imagenet100
    """
    from ablate.data.imagenet100 import build_imagenet100  # lazy: per command
    counts = build_imagenet100(imagenet, out, force=force)
    for split, c in counts.items():
        click.echo(f"{split}: {c['images']} images, {c['classes']} classes")
    click.echo(f"wrote {out}")


@data.command("imagenet1k")
@click.option("--imagenet", required=True, type=click.Path(file_okay=False),
              help="ImageNet-1K root: train/<wnid>/*.JPEG (the 1,000 classes) and val/, its images either in "
              "val/<wnid>/ or flat (ILSVRC2012_val_00000001.JPEG ..., as the official archive ships them)")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="new ImageNet-1K root; gets train/<wnid> and val/<wnid> as symbolic links")
@click.option("--val-labels", default=None, type=click.Path(dir_okay=False),
              help="labels of flat validation images: Kaggle's LOC_val_solution.csv, '<file name> <wnid>' lines, "
              "or one wnid per line (default: LOC_val_solution.csv, val_labels.txt or "
              "imagenet_2012_validation_synset_labels.txt in val/, the tree or beside it)")
@click.option("--force", is_flag=True, help="replace train/ and val/ of a non-empty --out")
def data_imagenet1k(imagenet, out, val_labels, force):
    """Check an ImageNet-1K tree (the 1,000 ILSVRC-2012 classes) and build a root for
    data.name: imagenet1k, as symbolic links: no image is copied. Flat validation images are
    sorted into class folders by a labels file. Every problem is named before anything is
    written.

    \b
    Examples:
      ablate data imagenet1k --imagenet /data/imagenet --out /data/imagenet1k
      ablate data imagenet1k --imagenet /data/kaggle/ILSVRC/Data/CLS-LOC --out /data/imagenet1k
    """
    from ablate.data.imagenet1k import build_imagenet1k  # lazy: per command
    result = build_imagenet1k(imagenet, out, val_labels=val_labels, force=force)
    if result["val_labels"] is not None:
        click.echo(f"val: sorted into class folders by {result['val_labels']}")
    elif val_labels is not None:
        click.echo(f"--val-labels: not used: {imagenet}/val is already in class folders")
    click.echo(f"ImageNet-1K: {result['classes']} classes, {result['train']} train images, {result['val']} val "
               f"images -> {result['out']}")


@data.command("fake-imagenet")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="where to write train/<wnid>/ and val/<wnid>/ (created; images already there are kept)")
@click.option("--train-per-class", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--val-per-class", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--classes", default="imagenet100", show_default=True, type=click.Choice(["imagenet100", "imagenet1k"]),
              help="imagenet100: CMC's 100 classes plus --decoys; imagenet1k: the 1,000 ILSVRC-2012 classes")
@click.option("--decoys", default=None, type=click.IntRange(min=0),
              help="extra classes that are not in ImageNet100 (ImageNet-1K's other classes; default: 10 with "
              "--classes imagenet100, none with imagenet1k)")
@click.option("--flat-val", is_flag=True,
              help="validation images flat in val/ (ILSVRC2012_val_<n>.JPEG, as the official archive ships them) "
              "with their labels in LOC_val_solution.csv, for ablate data imagenet1k")
@click.option("--max-side", default=None, type=click.IntRange(min=8),
              help="shrink every image to at most this many pixels a side (default: ImageNet's sizes); for "
              "rehearsals of the data commands, which never decode the images")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
def data_fake_imagenet(out, train_per_class, val_per_class, classes, decoys, flat_val, max_side, seed):
    """Generate an ImageNet-1K-shaped tree of JPEGs (the 100 ImageNet100 classes plus decoys, or
    all 1,000 classes, at ImageNet's sizes and aspect ratios, a few grayscale and CMYK files) to
    rehearse the paper path without ImageNet.

    \b
    Example (a paper spec end to end on a CPU, in minutes):
      ablate data fake-imagenet --out /tmp/fake-imagenet
      ablate data imagenet100 --imagenet /tmp/fake-imagenet --out /tmp/in100
      IMAGENET100_ROOT=/tmp/in100 ablate run experiments/paper/shift-patterns.yaml \\
          --set model.width=64 --set model.depth=2 --set train.epochs=1 --set train.batch_size=32
    \b
    Example (the ImageNet-1K archive's layout, for ablate data imagenet1k):
      ablate data fake-imagenet --out /tmp/fake-1k --classes imagenet1k --flat-val \\
          --train-per-class 1 --val-per-class 1
      ablate data imagenet1k --imagenet /tmp/fake-1k --out /tmp/in1k
    """
    from ablate.data.fake_imagenet import LABELS_FILE, make_fake_imagenet  # lazy: per command
    counts = make_fake_imagenet(out, train_per_class=train_per_class, val_per_class=val_per_class,
                                decoys=decoys, seed=seed, classes=classes, flat_val=flat_val, max_side=max_side)
    click.echo(f"train: {counts['train']} images, val: {counts['val']} images -> {out}")
    if flat_val:
        click.echo(f"val labels: {out.rstrip('/')}/{LABELS_FILE}")


@data.command("cache")
@click.argument("source", metavar="SPEC|DIR")
@click.option("--size", default=None, type=click.IntRange(min=8),
              help="stored side S in pixels (default: for a spec, data.cache_size or image_size/0.875 "
              "rounded down, i.e. 256 for 224 px; for a DIR, 256)")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="cache root (default: the spec's data.cache_dir, else <root>/.ablate-cache)")
@click.option("--workers", default=0, type=click.IntRange(min=0),
              help="decoding processes (default: one per CPU core)")
@click.option("--force", is_flag=True, help="rebuild caches that exist")
def data_cache(source, size, out, workers, force):
    """Decode every image of an image-folder tree (DIR, or SPEC's dataset) once into a uint8
    memory-mapped array per split, <root>/.ablate-cache/<split>-<S>/.

    Each image is kept whole, its short side resized to S. Training then reads batches from
    the array and crops (relative to the whole image, as the folder loader does), flips,
    augments and normalises them as tensor ops (on the GPU when there is one); data.loader:
    auto uses the cache once it exists. Unreadable images are skipped and counted. A killed
    build leaves no partial cache. A cache whose image tree has changed since (files added,
    removed, renamed, rewritten or touched), or in an older format, is rebuilt; training
    refuses such a cache.

    \b
    Examples:
      ablate data cache /data/imagenet100 --size 256
      ablate data cache experiments/paper/shift-patterns.yaml
    """
    from ablate.data.cache import build_cache, cache_targets  # lazy: per command
    for target in cache_targets(source, size=size, cache_dir=out):
        summary = build_cache(target.root, target.size, cache_dir=target.cache_dir, workers=workers, force=force,
                              log=click.echo)
        for split, s in summary.items():
            state = f"{s['seconds']:.1f} s" if s["built"] else "exists and is current, --force rebuilds it"
            if s["rebuilt"]:
                state += f"; rebuilt: {s['rebuilt']}"
            click.echo(f"{split}-{target.size}: {s['images']} images, {s['skipped']} skipped ({state}) -> {s['path']}")


# ---- plan / spec-help ------------------------------------------------------------------------

@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
@click.option("--no-data-check", is_flag=True, hidden=True,
              help="accepted for old scripts: plan never needs the data in place")
@spec_options
@click.option("--gpu-memory", default=None, metavar="SIZE",
              help="memory of one GPU for the micro-batch column, e.g. 80GB, 24G, 48GiB (default: this machine's "
              "GPU, else 80 GB)")
@click.option("--gpus-per-cell", default=1, show_default=True, type=click.IntRange(min=1),
              help="processes that train one cell together (the batch is split over them)")
@click.option("--gpu", default=None, metavar="NAME",
              help="the kind of device to price for, matched in the GPU names runs recorded, e.g. H100, A100, or cpu "
              "(default: this machine's GPU, else an H100 the plan says it assumed; with --gpu-memory alone, "
              "nothing is priced); cpu prices in CPU-hours")
@click.option("--mfu", default=None, type=click.FloatRange(min=0, min_open=True, max=1),
              help="price cells that no run measured with the FLOP model at this model FLOPs utilisation")
def plan(spec, as_json, no_data_check, spec_args, gpu_memory, gpus_per_cell, gpu, mfu):
    """Validate SPEC and show its cells, params, GMACs, memory and device-hours priced from measured runs.

    Reads no dataset, trains nothing and writes nothing. The data need not be in place yet: a
    dataset root that does not exist, or whose ${VAR} is unset, is named in the plan (ablate
    run refuses it).
    """
    from ablate.memory import parse_size  # lazy: per command
    from ablate.plan import plan as make_plan  # lazy: per command
    try:
        memory = parse_size(gpu_memory) if gpu_memory is not None else None
    except ValueError as e:
        raise AblateError(f"--gpu-memory: {e}") from None
    result = make_plan(spec_args.load(spec, check_paths=False), gpu_memory=memory, processes=gpus_per_cell,
                       gpu=gpu, mfu=mfu)
    click.echo(result.to_json() if as_json else result.to_text())


@cli.command("spec-help")
def spec_help():
    """Every data, model and train setting of a spec: type, default and description."""
    from ablate.spec import format_settings_help  # lazy: per command
    click.echo(format_settings_help())

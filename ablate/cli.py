"""The ``ablate`` command line: parse, call a plain function, print.

Every command's work is a function in the package that tests call directly; here we only
translate options and turn :class:`~ablate.errors.AblateError` into a one-line message and
exit status 2.
"""
from __future__ import annotations

import functools
import sys

import click

from ablate import __version__
from ablate.errors import AblateError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AblateError as e:
            for line in str(e).splitlines():
                click.echo(f"error: {line}", err=True)
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
        from ablate.spec import MAX_CELLS, SpecArgs
        spec_args = SpecArgs(tuple(overrides), experiment_name, max_cells or MAX_CELLS)
        return command(*args, spec_args=spec_args, **kwargs)

    for option in reversed([
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="override a setting of the spec, e.g. --set model.width=64 --set train.epochs=1 "
                     "(repeatable; any data.*, model.*, train.* setting or seeds; YAML values: "
                     "\"model.shift=[[0,1],[0,-1]]\", train.randaugment=null). Runs with overrides record "
                     "into their own experiment, <name>+<hash of the overrides>"),
        click.option("--name", "experiment_name", default=None,
                     help="MLflow experiment (and ledger study) to record into instead of the spec's name "
                     "(or of <name>+<hash> with --set)"),
        click.option("--max-cells", type=click.IntRange(min=1), default=None,
                     help="refuse a grid of more cells than this (default 10,000), counted before any is built"),
    ]):
        with_spec_args = option(with_spec_args)
    return with_spec_args



# ---- run / search ----------------------------------------------------------------------------

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
    click.option("--checkpoints", default=None, help="checkpoint folder, shared by all workers of a grid "
                 "(default: $ABLATE_CHECKPOINTS or ./checkpoints)"),
]


def _with_worker_options(f):
    for option in reversed(_worker_options):
        f = option(f)
    return f


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@_with_worker_options
@spec_options
def run(spec, workers, storage, device, devices, checkpoints, spec_args):
    """Train every cell of SPEC's grid once; re-running resumes and skips finished cells."""
    from ablate.runner import print_summary, run_grid
    summary = run_grid(spec, workers=workers, storage=storage, device=device, devices=_devices(devices),
                       checkpoints=checkpoints, spec_args=spec_args)
    print_summary(summary)
    sys.exit(0 if summary.ok else 1)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--trials", default=None, type=int, help="total trials the study should hold (default: the spec's)")
@_with_worker_options
@spec_options
def search(spec, trials, workers, storage, device, devices, checkpoints, spec_args):
    """Run SPEC's Optuna search up to its number of trials; re-running continues the same study."""
    from ablate.runner import run_search
    counts = run_search(spec, trials=trials, workers=workers, storage=storage, device=device,
                        devices=_devices(devices), checkpoints=checkpoints, spec_args=spec_args)
    click.echo("trials: " + ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())))


# ---- report ----------------------------------------------------------------------------------

@cli.command()
@click.argument("target", metavar="SPEC_OR_EXPERIMENT")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="output folder (default: results/<name>)")
@spec_options
def report(target, out, spec_args):
    """Tables and plots of an experiment's finished runs, read from MLflow, into results/<name>/.

    With --set (or --name), the report of the runs made with those same options."""
    from ablate.report import write_report
    command = " ".join(["ablate report", target, *(f"--set {o}" for o in spec_args.overrides)]
                       + ([f"--name {spec_args.name}"] if spec_args.name else []) + ([f"--out {out}"] if out else []))
    rep = write_report(target, out, command=command, spec_args=spec_args)
    runs = rep.counts["COMPLETE"]
    click.echo(f"{rep.experiment}: {runs} runs in {len(rep.rows)} configurations -> "
               + ", ".join(str(p) for p in rep.files))
    if rep.parent_run_id:
        click.echo(f"logged under report/ of MLflow run {rep.parent_run_id} ({rep.tracking_uri})")


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
    """
    from ablate.models.cost import cost_row, format_table, model_cost, model_config_from_overrides, variant_rows
    if not assignments and base == "s2mlp_wide_16_224":
        click.echo(format_table(variant_rows(classes)))
        return
    cfg = model_config_from_overrides(assignments, base=base)
    cost = model_cost(cfg, classes)
    click.echo(format_table([cost_row("config", cfg, classes)]))
    click.echo(" ".join(f"{k}={v}" for k, v in cost.as_dict().items()))


# ---- ui --------------------------------------------------------------------------------------

@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="interface to listen on (0.0.0.0 exposes the UI to the network)")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535), help="MLflow UI port")
@click.option("--optuna", is_flag=True, help="also start optuna-dashboard on the ledger (needs the dashboard "
              "extra: pip install -e '.[dashboard]')")
@click.option("--optuna-port", default=None, type=click.IntRange(1, 65535),
              help="optuna-dashboard port (default: --port + 1)")
@click.option("--storage", default=None, help="ledger storage URL for --optuna (default: $ABLATE_STORAGE "
              "or sqlite:///ablate-ledger.db)")
def ui(host, port, optuna, optuna_port, storage):
    """Browse the runs: the MLflow UI on the store the runs use, until Ctrl-C."""
    from ablate.ui import serve
    serve(host, port, optuna=optuna, storage=storage, optuna_port=optuna_port, echo=click.echo)


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
    from ablate.data.imagenet100 import build_imagenet100
    counts = build_imagenet100(imagenet, out, force=force)
    for split, c in counts.items():
        click.echo(f"{split}: {c['images']} images, {c['classes']} classes")
    click.echo(f"wrote {out}")


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
    from ablate.data.cache import build_cache, cache_targets
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
def plan(spec, as_json, no_data_check, spec_args):
    """Validate SPEC and show its cells, params, GMACs and an estimated GPU-hours cost.

    Reads no dataset, trains nothing and writes nothing. The data need not be in place yet: a
    dataset root that does not exist, or whose ${VAR} is unset, is named in the plan (ablate
    run refuses it).
    """
    from ablate.plan import plan as make_plan
    result = make_plan(spec_args.load(spec, check_paths=False))
    click.echo(result.to_json() if as_json else result.to_text())


@cli.command("spec-help")
def spec_help():
    """Every data, model and train setting of a spec: type, default and description."""
    from ablate.spec import format_settings_help
    click.echo(format_settings_help())

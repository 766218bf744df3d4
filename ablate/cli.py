"""The ``ablate`` command line: parse, call a plain function, print.

Every command's work is a function in the package that tests call directly; here we only
translate options and turn :class:`~ablate.errors.AblateError` into a one-line message and
exit status 2.
"""
from __future__ import annotations

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


# ---- report ----------------------------------------------------------------------------------

@cli.command()
@click.argument("target", metavar="SPEC_OR_EXPERIMENT")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="output folder (default: results/<name>)")
def report(target, out):
    """Tables and plots of an experiment's finished runs, read from MLflow, into results/<name>/."""
    from ablate.report import write_report
    command = "ablate report " + target + (f" --out {out}" if out else "")
    rep = write_report(target, out, command=command)
    runs = rep.counts["COMPLETE"]
    click.echo(f"{rep.experiment}: {runs} runs in {len(rep.rows)} configurations -> "
               + ", ".join(str(p) for p in rep.files))
    if rep.parent_run_id:
        click.echo(f"logged under report/ of MLflow run {rep.parent_run_id} ({rep.tracking_uri})")

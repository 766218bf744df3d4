"""``ablate cancel``: stop a spec's Slurm jobs and leave every unfinished cell resumable.

scancel stops the tasks (SIGTERM, then SIGKILL after the cluster's KillWait). Once Slurm says
they have ended, the cells their workers held are queued again at once (rather than after their
heartbeats go stale), to resume from their last epoch checkpoint and continue their MLflow run
at the next launch; the launches' parent runs are marked KILLED.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ablate import names, tracking
from ablate.errors import AblateError
from ablate.launch.jobs import Launch, active_jobs, cancel_jobs, job_of, launches
from ablate.ledger import Ledger, NoLedger, storage_url
from ablate.locks import retry_busy
from ablate.spec.builder import SpecArgs
from ablate.urls import display_url


@dataclass
class Cancelled:
    launches: list[Launch]   # the launches whose jobs were cancelled
    still_ending: list[str]  # job ids Slurm still shows as ending after the wait
    released: list[int]      # trials (cells running when cancelled) queued again to resume


def cancel(spec_path: str, storage: Optional[str] = None, *, spec_args=None) -> Cancelled:
    spec = (spec_args or SpecArgs()).load(spec_path, check_paths=False)
    url = storage_url(storage)
    try:
        ledger = Ledger.for_spec(spec, url, create=False)
    except NoLedger:
        raise AblateError(f"{spec_path}: nothing to cancel: no ledger for {spec.name!r} at {display_url(url)} "
                          "(allowed: --storage URL of the ledger the jobs use)") from None
    records = launches(ledger.study)
    if not records:
        raise AblateError(f"{spec_path}: nothing to cancel: no Slurm launch is recorded for {spec.name!r} in "
                          f"{display_url(url)} (allowed: a spec launched with --launcher slurm)")
    active = set(active_jobs([r.job for r in records]))
    mine = [r for r in records if r.job in active]
    still = cancel_jobs(sorted(active, key=int))
    ended = active - set(still)
    released = ledger.release_gone(lambda t: job_of(str(t.user_attrs.get(names.SLURM_TASK) or "_")) in ended)
    _close_parents([r.parent_run for r in mine if r.job in ended])
    return Cancelled(mine, still, released)


def _close_parents(run_ids: list[str]) -> None:
    if not run_ids:
        return
    client = tracking.client()
    for run_id in run_ids:
        if retry_busy(client.get_run, run_id).info.status == "RUNNING":
            tracking.finish_run(run_id, "KILLED")

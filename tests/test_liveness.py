"""One judgement of whether a recorded process is gone, for workers (ledger), commands (MLflow
parent runs) and `ablate status`: real processes, no mocks."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from ablate import liveness


def _dead_pid() -> str:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return str(p.pid)


def test_a_process_is_judged_only_where_its_pid_means_it():
    dead, me = _dead_pid(), str(os.getpid())
    here, host = liveness.process_space(), socket.gethostname()
    assert liveness.gone(dead, space=here, host=host)
    assert liveness.gone(dead, space=here) and liveness.gone(dead, host=host)  # records with one of the two
    assert not liveness.gone(me, space=here, host=host)
    assert not liveness.gone(dead, space="other-boot/pid:[1]", host=host)   # another container or machine
    assert not liveness.gone(dead, space=here, host="elsewhere")           # every recorded name must be ours
    assert not liveness.gone(dead) and not liveness.gone("", space=here)   # nothing to judge by


def test_a_reused_pid_is_another_process():
    me = str(os.getpid())
    start = liveness.process_start(os.getpid())
    assert start and not liveness.gone(me, space=liveness.process_space(), start=start)
    assert liveness.gone(me, space=liveness.process_space(), start=str(int(start) + 1))


def test_a_worker_is_named_host_colon_pid():
    assert liveness.worker_id() == f"{socket.gethostname()}:{os.getpid()}"
    assert liveness.worker_gone(f"{socket.gethostname()}:{_dead_pid()}", liveness.process_space())
    assert not liveness.worker_gone(liveness.worker_id(), liveness.process_space())
    assert not liveness.worker_gone(f"elsewhere:{_dead_pid()}")

"""The processes that train one cell together: a torch.distributed group, rank 0 its leader.

Only the leader talks to the ledger and MLflow and writes checkpoints. It hands each cell to
the others as a JSON message (:meth:`CellGroup.send`; never a pickle), every rank trains it
(DistributedDataParallel: NCCL on CUDA, gloo on a CPU), and the leader says at every epoch's end
whether the cell goes on (:meth:`CellGroup.leader_says`): pruning, a lost trial or an error in
its writes stop all ranks at the same point. Anything else that breaks one rank (it dies, runs
out of memory alone) breaks the group: collectives fail or time out
(``ABLATE_DIST_TIMEOUT``, seconds), the attempt ends, and the cell resumes from its last
checkpoint like any interrupted one.
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

from ablate.environ import positive_number

if TYPE_CHECKING:  # torch is imported where a group is used: the runner's light commands (status) import this
    import torch

#: seconds a rank waits in a collective before the attempt is given up (a rank died)
DEFAULT_TIMEOUT = 600.0


class GroupBroken(Exception):
    """A rank of the cell's group died or stopped answering: the attempt ends, the cell resumes."""


class StoppedByLeader(Exception):
    """The leader stopped the cell (pruned, taken over, or it failed to record): not this rank's business."""


def dist_timeout() -> float:
    timeout = positive_number("ABLATE_DIST_TIMEOUT", "seconds, a positive number")
    return DEFAULT_TIMEOUT if timeout is None else timeout


_LEFT = "ablate/ranks_left"  # the rendezvous store's count of ranks that have left after a normal end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class CellGroup:
    """One rank's view of its cell's group. ``CellGroup()`` is a cell trained by one process."""
    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def join(cls, rank: int, size: int, address: str, device: "torch.device") -> "CellGroup":
        """Join the group at ``address`` (``tcp://host:port``): NCCL on CUDA, gloo on a CPU."""
        import torch.distributed as dist  # lazy: torch; ablate status imports this module
        if size > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=address, rank=rank, world_size=size,
                                    timeout=timedelta(seconds=dist_timeout()),
                                    device_id=device if device.type == "cuda" else None)
        return cls(rank, size)

    def leave(self, done: bool = False) -> None:
        """Leave the group; ``done``: every rank ended its work normally and leaves now.

        Rank 0 holds the rendezvous store: its process ending while another rank still tears its
        side down makes torch abort that rank ("terminate called without an active exception"),
        and a Slurm task that finished its work ends FAILED. So on a normal end the ranks meet
        once more, the others leave first, and rank 0 waits (up to a minute) until they have."""
        import torch.distributed as dist  # lazy: torch; ablate status imports this module
        if not (self.distributed and dist.is_initialized()):
            return
        if done:
            try:
                _collective(dist.barrier)
            except GroupBroken:  # a rank died at the very end: nobody to wait for
                dist.destroy_process_group()
                return
            store = dist.distributed_c10d._get_default_store()  # private torch: the group's rendezvous store
            if not self.leader:
                store.add(_LEFT, 1)
            else:
                deadline = time.monotonic() + 60
                while store.add(_LEFT, 0) < self.size - 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)  # their last store call answered: let them close their connection
        dist.destroy_process_group()

    # ---- collectives (no-ops for one process) ----------------------------------------------

    def _device(self, tensor: "torch.Tensor") -> "torch.Tensor":
        import torch.distributed as dist  # lazy: torch; ablate status imports this module
        return tensor.cuda() if dist.get_backend() == "nccl" else tensor

    def sum(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """The element-wise sum of ``tensor`` over the ranks (a new tensor on ``tensor``'s device)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist  # lazy: torch; ablate status imports this module
        t = self._device(tensor.detach().clone())
        _collective(dist.all_reduce, t)
        return t.to(tensor.device)

    def min(self, value: int) -> int:
        if not self.distributed:
            return value
        import torch  # lazy: torch; ablate status imports this module
        import torch.distributed as dist  # lazy: torch; ablate status imports this module
        t = self._device(torch.tensor([value], dtype=torch.int64))
        _collective(dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def send(self, message: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The leader's ``message`` on every rank (JSON over a broadcast; the others pass None)."""
        if not self.distributed:
            return message or {}
        import torch  # lazy: torch; ablate status imports this module
        import torch.distributed as dist  # lazy: torch; ablate status imports this module
        data = json.dumps(message).encode() if self.leader else b""
        length = self._device(torch.tensor([len(data)], dtype=torch.int64))
        _collective(dist.broadcast, length, src=0)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.leader else \
            torch.empty(int(length.item()), dtype=torch.uint8)
        payload = self._device(payload)
        _collective(dist.broadcast, payload, src=0)
        return json.loads(bytes(payload.cpu().tolist()).decode())

    def leader_says(self, go_on: bool, why: str = "") -> None:
        """Every rank learns whether the leader goes on; the others raise :class:`StoppedByLeader`
        when it does not (the leader raises its own reason)."""
        if not self.distributed:
            return
        said = self.send({"go_on": go_on, "why": why} if self.leader else None)
        if not said["go_on"] and not self.leader:
            raise StoppedByLeader(said["why"])


def is_group_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another rank is gone or silent: torch's
    distributed errors, and gloo's, which DistributedDataParallel's gradient reduction raises as a
    plain RuntimeError ("Connection reset by peer", "Connection closed by peer", a timeout)."""
    import torch.distributed as dist  # lazy: torch; ablate status imports this module
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("gloo" in text or "NCCL" in text or "Connection reset by peer" in text
                                            or "Connection closed by peer" in text)


def group_broken(e: BaseException) -> GroupBroken:
    return GroupBroken(f"a process of this cell's group stopped answering ({str(e).splitlines()[0][:200]})")


def _collective(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:
        if not is_group_failure(e):
            raise
        raise group_broken(e) from e

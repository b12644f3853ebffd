"""The experts' combine between the expert-parallel ranks of one host, through shared memory.

gloo sends every message through the loopback TCP stack and wakes a receiving thread: 0.3-0.9 ms
an all-gather on the 2-vCPU VM (bench/ep.py), of the order of a tiny model's whole expert compute
in a layer. Ranks on one host share a file in /dev/shm instead: a rank copies its rows into its
slot and raises its counter (cpu_shm.cpp orders the two), every rank waits until all counters
reach the call's number, then reads the others' rows where they lie. Each rank has two slots,
used by turns: a rank writes call n + 2's rows only after every rank has published call n + 1,
which each does only after it has read call n's.

Every rank makes the same calls in the same order (the ranks run the same program on the same
routing), so the call numbers agree. A rank that exits is noticed within WAKE_S; one that stops
answering, after the process group's timeout.
"""
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist

SLOT_BYTES = 4 << 20  # a rank's rows a call; larger messages take the process group's all-gather
LINE = 8              # the counters lie a cache line (8 int64) apart: no rank's store evicts another's
WAKE_S = 0.2          # how often a waiting rank looks whether the ranks it waits for still run


class SharedRows:
    """A shared-memory all-gather of the ranks on this host (`create` makes one on every rank)."""

    def __init__(self, rank: int, world: int, buffer: torch.Tensor, pids: list[int], timeout_s: float, lib):
        self.rank, self.world, self.pids, self.timeout_s, self.lib = rank, world, pids, timeout_s, lib
        self.buffer = buffer  # keeps the mapping alive
        self.counters = buffer[:LINE * 8 * world].view(torch.int64)
        self.slots = buffer[LINE * 8 * world:].view(2, world, SLOT_BYTES)
        self.calls = 0

    @classmethod
    def create(cls, rank: int, world: int, pg=None, timeout_s: float = 60.0) -> "SharedRows | None":
        """Collective over `pg`'s ranks. None on every rank unless all of them run on this host, on
        the CPU, with the native library (the ordering steps) and a writable /dev/shm."""
        from ..kernels.native import native
        lib = native() if dist.get_backend(pg) == "gloo" else None
        here = (socket.gethostname(), os.getpid(), lib is not None and os.access("/dev/shm", os.W_OK))
        peers = [None] * world
        dist.all_gather_object(peers, here, group=pg)
        if not all(host == here[0] and ok for host, _, ok in peers):
            return None
        size = LINE * 8 * world + 2 * world * SLOT_BYTES
        box = [None]
        if rank == 0:
            try:
                fd, box[0] = tempfile.mkstemp(prefix="tinymoe-ep-", dir="/dev/shm")
                os.ftruncate(fd, size)
                os.close(fd)
            except OSError:
                box[0] = None
        dist.broadcast_object_list(box, src=0, group=pg)
        path, buffer = box[0], None
        if path is not None:
            try:
                buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
            except RuntimeError:
                buffer = None
        mapped = [None] * world
        dist.all_gather_object(mapped, buffer is not None, group=pg)
        if rank == 0 and path is not None:
            os.unlink(path)  # every rank has it mapped (or none uses it): nothing is left behind
        if not all(mapped):
            return None
        return cls(rank, world, buffer, [pid for _, pid, _ in peers], timeout_s, lib)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= SLOT_BYTES

    def all_gather(self, rows: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """rows [counts[rank], D] of this rank -> every rank's rows, in rank order (views of the
        shared slots, valid until this rank's next call but one). Each rank's rows must fit."""
        if not self.fits(rows.numel() * rows.element_size()):
            raise ValueError(f"{rows.numel() * rows.element_size()} bytes do not fit a {SLOT_BYTES}-byte slot")
        self.calls += 1
        turn, width = self.calls % 2, rows.shape[1]
        rows = rows.contiguous()
        self.lib.shm_publish(self.slots[turn, self.rank].data_ptr(), rows.data_ptr(),
                             rows.numel() * rows.element_size(), self.counters[self.rank * LINE:].data_ptr(),
                             self.calls)
        self._wait()
        size = rows.element_size() * width
        return [rows if g == self.rank else
                self.slots[turn, g, :n * size].view(rows.dtype).view(n, width) for g, n in enumerate(counts)]

    def barrier(self) -> None:
        self.calls += 1
        self.lib.shm_publish(self.slots[0, self.rank].data_ptr(), self.slots[0, self.rank].data_ptr(), 0,
                             self.counters[self.rank * LINE:].data_ptr(), self.calls)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.lib.shm_wait(self.counters.data_ptr(), self.world, LINE, self.calls, int(WAKE_S * 1e6)):
            behind = [g for g in range(self.world) if int(self.counters[g * LINE]) < self.calls]
            gone = [g for g in behind if not _alive(self.pids[g])]
            if gone:
                raise RuntimeError(f"rank {gone[0]} exited before the experts' combine")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {behind[0]} did not reach the experts' combine within {self.timeout_s:g} s")


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (an exited child its parent has not reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

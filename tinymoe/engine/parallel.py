"""Expert parallelism over torch.distributed: starting the ranks, sharding a model's experts,
and the ranks that follow rank 0.

Each rank is a process with the whole model but only its expert copies (`experts/parallel.py`
computes a layer across them). Rank 0 is the caller's process; tinymoe starts ranks 1..G-1 as
`python -m tinymoe.engine.parallel` subprocesses (one CPU thread each by default), or joins the
`torchrun` launch it runs in (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT set). The group speaks
gloo on the CPU and NCCL on CUDA; every collective times out after `TIMEOUT_S`, and a rank that
exits makes rank 0 raise `ParallelError` naming it.

Two ways to run across ranks:
- `LLM(..., expert_parallel=G)`: every rank builds the same engine; rank 0 schedules and samples,
  and before each forward sends the step's packed inputs (`StepInputs`) to the others, which run
  the same forward on their own KV cache (`follow`). chat, generate and serve run this way.
- `run_spmd(G, "module:function", kwargs)`: every rank calls the same deterministic function
  (bench and eval); only rank 0's return value comes back.
"""
import datetime
import os
import pickle
import socket
import subprocess
import signal
import sys
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..experts.exchange import SharedRows
from ..experts.parallel import ExpertGroup, ExpertShard
from ..experts.placement import parse_placement

TIMEOUT_S = float(os.environ.get("TINYMOE_EP_TIMEOUT", "60"))


class ParallelError(RuntimeError):
    """A rank of an expert-parallel run failed or left."""


class Ranks:
    """One expert-parallel run seen from this rank: its `group` (an ExpertGroup) and, on rank 0
    of a run tinymoe started, the worker processes."""

    def __init__(self, group: ExpertGroup, procs=(), affinity=None):
        self.group, self.procs, self.closed = group, list(procs), False
        self.affinity = affinity  # this process's CPUs before `_pin` narrowed them (None: not pinned)

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world(self) -> int:
        return self.group.world

    def broadcast(self, obj=None):
        """Rank 0's `obj` on every rank."""
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group.pg)
        except RuntimeError as e:
            raise self.failure(e) from e
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        out = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self.group.pg)
        except RuntimeError as e:
            raise self.failure(e) from e
        return out

    def step(self, forward, inputs):
        """Rank 0: send the step to the other ranks, run it here. A Ctrl-C waits for the step's end
        (the ranks would otherwise stop in different collectives), then raises."""
        with _interrupt_after():
            self.broadcast(inputs)
            try:
                return forward(inputs)
            except RuntimeError as e:
                if isinstance(e, ParallelError) or not (isinstance(e, dist.DistError) or self.dead()):
                    raise
                raise self.failure(e) from e

    def dead(self) -> list[tuple[int, int]]:
        """(rank, exit code) of the started ranks that have exited."""
        return [(r, p.poll()) for r, p in enumerate(self.procs, 1) if p.poll() is not None]

    def failure(self, error: Exception) -> ParallelError:
        """The clear error for a collective that failed: which started rank exited, if one did."""
        for p in self.procs:  # a peer's socket closes just before its process is gone
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        dead = self.dead()
        if dead:
            who = ", ".join(f"rank {r} exited with code {code}" for r, code in dead)
            return ParallelError(f"expert parallelism stopped: {who}")
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return ParallelError(f"expert parallelism stopped: a collective failed on rank {self.rank} ({first})")

    def close(self, followers: bool = False):
        """Leave the group; rank 0 first tells `followers` (ranks in `follow`) to stop and waits
        for the processes it started."""
        if self.closed:
            return
        self.closed = True
        if followers and self.rank == 0 and not any(p.poll() is not None for p in self.procs):
            try:
                self.broadcast(None)
            except ParallelError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.affinity is not None:
            os.sched_setaffinity(0, self.affinity)


@contextmanager
def _interrupt_after():
    """SIGINT inside the block is raised when the block ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@contextmanager
def closed_on_error(ranks: "Ranks | None"):
    """Stop the started ranks if what follows fails (a bad checkpoint, an interrupt)."""
    try:
        yield
    except BaseException:
        if ranks is not None:
            ranks.close()
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, addr: str, port: int) -> ExpertGroup:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    group = ExpertGroup(rank, world, combine=os.environ.get("TINYMOE_EP_COMBINE") or "auto")
    if os.environ.get("TINYMOE_EP_SHM", "1") != "0":
        group.shared = SharedRows.create(rank, world, timeout_s=TIMEOUT_S)
    return group


def check_world(world) -> int:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"expert_parallel takes a number of ranks (1 or more), not {world!r}")
    return world


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def start(world: int, target: str, payload: dict, threads: int = 1) -> Ranks:
    """This process as rank 0 of `world` ranks. Under torchrun: join it (its WORLD_SIZE must be
    `world`). Else start ranks 1..world-1, each running `target` ("llm" or "module:function")
    with `payload`, with `threads` CPU threads."""
    if under_torchrun():
        size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if size != world:
            raise ValueError(f"expert_parallel={world} inside a torchrun launch of {size} processes")
        return Ranks(_init(rank, world, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
    addr, port = "127.0.0.1", _free_port()
    procs = []
    for rank in range(1, world):
        env = dict(os.environ, TINYMOE_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        p = subprocess.Popen([sys.executable, "-m", "tinymoe.engine.parallel"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, env=env)
        p.stdin.write(pickle.dumps((rank, world, addr, port, target, payload)))
        p.stdin.close()
        procs.append(p)
    try:
        group = _init(0, world, addr, port)
    except Exception as e:
        for p in procs:
            p.kill()
        raise ParallelError(f"expert parallelism could not start {world} ranks: {e}") from e
    return Ranks(group, procs, _pin(0, world, threads))  # after the start: the ranks inherit every CPU


def _pin(rank: int, world: int, threads: int):
    """Give rank `rank` CPUs of its own, [rank * threads, (rank + 1) * threads) of the CPUs this
    process may use, when there are enough for every rank (TINYMOE_EP_PIN=0: never): a rank's
    threads then never wait behind another rank's. -> the CPUs before, or None if not pinned."""
    if os.environ.get("TINYMOE_EP_PIN", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    before = os.sched_getaffinity(0)
    cpus = sorted(before)
    if world * threads > len(cpus):
        return None
    os.sched_setaffinity(0, cpus[rank * threads:(rank + 1) * threads])
    return before


def shard_model(model, ranks: Ranks, placement: str = "contiguous", calib=None) -> None:
    """Keep on this rank only its copies of every MoE layer's experts, placed by `placement`
    (`experts/placement.py`; eplb reads the layers' calibrated loads from `calib`)."""
    parse_placement(placement)
    if calib is not None and not hasattr(calib, "layer"):
        from ..routing.calibrate import load_calibration
        calib = load_calibration(calib)
    for block in model.moe_blocks():
        layer = calib.layer(block.ctx.layer) if calib is not None else None
        load = layer.get("load") if layer else None
        block.experts.set_shard(ExpertShard(ranks.group, placement, load))
    model.expert_ranks = ranks


def follow(llm) -> None:
    """Ranks 1..: run rank 0's steps on this rank's engine until rank 0 closes."""
    ranks = llm.runner.ranks
    while True:
        inputs = ranks.broadcast()
        if inputs is None:
            break
        llm.runner.forward(inputs)
    ranks.close()


def run_spmd(world: int, target: str, payload: dict, threads: int = 1):
    """`target(ranks=..., **payload)` on every rank; rank 0's result. `target` is "module:function"."""
    ranks = start(world, target, payload, threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _call(target, ranks, payload)
    except RuntimeError as e:
        if isinstance(e, ParallelError):
            raise
        raise ranks.failure(e) from e
    finally:
        torch.set_num_threads(before)
        ranks.close()


def _call(target: str, ranks: Ranks, payload: dict):
    import importlib
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(ranks=ranks, **payload)


def _worker() -> None:
    rank, world, addr, port, target, payload = pickle.loads(sys.stdin.buffer.read())
    threads = int(os.environ.get("TINYMOE_THREADS", "1"))
    torch.set_num_threads(threads)
    _pin(rank, world, threads)
    ranks = Ranks(_init(rank, world, addr, port))
    if target == "llm":
        from .llm import LLM
        follow(LLM(**payload, expert_parallel=ranks))
    else:
        try:
            _call(target, ranks, payload)
        finally:
            ranks.close()


if __name__ == "__main__":  # run as a module: take the package's classes, not this file's copies
    from tinymoe.engine.parallel import _worker as main
    main()

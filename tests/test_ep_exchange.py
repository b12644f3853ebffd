"""The experts' all-gather through shared memory (tinymoe/experts/exchange.py) between two ranks
of this host: every rank's rows arrive, over many calls (the two slots used by turns), empty
shares and shares too large for a slot (the process group's all-gather instead) included; the
same rows as the process group's all-gather; a rank that exits is noticed at once; no file is
left in /dev/shm; and TINYMOE_EP_SHM=0 turns it off. Also each rank's CPUs of its own
(engine/parallel.py `_pin`). The functions below run on every rank (`run_spmd` imports this
file on the started rank: PYTHONPATH holds tests/)."""
import glob
import os
import time
from pathlib import Path

import pytest
import torch

from tinymoe.engine.parallel import ParallelError, run_spmd
from tinymoe.experts.exchange import SLOT_BYTES
from tinymoe.kernels.native import native

pytestmark = pytest.mark.skipif(native() is None or not os.access("/dev/shm", os.W_OK),
                                reason="no native library or no /dev/shm here")
D = 96


def rows_of(rank: int, call: int, n: int, dtype=torch.bfloat16) -> torch.Tensor:
    return (torch.arange(n * D, dtype=torch.float32).view(n, D) + 1000 * rank + 7 * call).to(dtype)


def counts_of(call: int) -> list[int]:
    return [(3 * call + 1) % 11, (5 * call) % 7]  # rank 1 has none every 7th call


def gather_calls(ranks, calls: int, big: bool = False) -> dict:
    """Every rank: `calls` all-gathers (each checked against the rows every rank sent), through
    the group's shared memory and, for the same rows, the process group's."""
    group, shared = ranks.group, ranks.group.shared
    ok = []
    for call in range(calls):
        counts = counts_of(call)
        if big:  # a share past one slot: the process group's all-gather takes it
            counts = [SLOT_BYTES // (D * 4) + 3, 2]
        dtype = torch.float32 if big else torch.bfloat16
        got = group.all_gather(rows_of(ranks.rank, call, counts[ranks.rank], dtype), counts)
        want = [rows_of(r, call, n, dtype) for r, n in enumerate(counts)]
        ok.append(all(torch.equal(a, b) for a, b in zip(got, want)))
    group.shared = None
    by_pg = group.all_gather(rows_of(ranks.rank, 0, counts_of(0)[ranks.rank]), counts_of(0))
    group.shared = shared
    group.barrier()
    return {"shared": shared is not None, "ok": all(ok), "calls": shared.calls if shared else 0,
            "pg": [t.tolist() for t in by_pg]}


def exit_before_the_combine(ranks) -> None:
    if ranks.rank == 1:
        os._exit(3)
    time.sleep(0.5)
    ranks.group.all_gather(rows_of(0, 0, 2), [2, 2])


@pytest.fixture(autouse=True)
def importable(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))


def test_every_rank_gets_every_ranks_rows_over_many_calls():
    before = set(glob.glob("/dev/shm/tinymoe-ep-*"))
    out = run_spmd(2, "test_ep_exchange:gather_calls", dict(calls=25))
    assert out["shared"] and out["ok"]
    assert out["calls"] == 26  # 25 gathers and the barrier, each one call number
    assert out["pg"] == [rows_of(r, 0, n).tolist() for r, n in enumerate(counts_of(0))]
    assert set(glob.glob("/dev/shm/tinymoe-ep-*")) == before


def test_a_share_past_a_slot_takes_the_process_group():
    out = run_spmd(2, "test_ep_exchange:gather_calls", dict(calls=2, big=True))
    assert out["shared"] and out["ok"] and out["calls"] == 1  # only the barrier went through the slots


def test_a_rank_that_exits_before_the_combine_is_noticed_at_once():
    start = time.monotonic()
    with pytest.raises(ParallelError, match="rank 1 exited with code 3"):
        run_spmd(2, "test_ep_exchange:exit_before_the_combine", {})
    assert time.monotonic() - start < 20  # far inside the 60 s timeout: the waiting rank looks


def test_tinymoe_ep_shm_0_uses_the_process_group(monkeypatch):
    monkeypatch.setenv("TINYMOE_EP_SHM", "0")
    out = run_spmd(2, "test_ep_exchange:gather_calls", dict(calls=3))
    assert not out["shared"] and out["ok"]


def cpus(ranks) -> list:
    return ranks.gather(sorted(os.sched_getaffinity(0)))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
@pytest.mark.parametrize("pin", ["1", "0"])
def test_each_rank_gets_cpus_of_its_own_and_the_caller_its_own_back(monkeypatch, pin):
    monkeypatch.setenv("TINYMOE_EP_PIN", pin)
    before = sorted(os.sched_getaffinity(0))
    got = run_spmd(2, "test_ep_exchange:cpus", {})
    if pin == "1" and len(before) >= 2:
        assert got == [[before[0]], [before[1]]]
    else:
        assert got == [before, before]
    assert sorted(os.sched_getaffinity(0)) == before

"""The thread governor (engine/cpu_share.py): cores minus the cores other work keeps busy, from
/proc/stat, checked at most every interval; and the engine steps with what it chooses only when
the threads are not fixed."""
import pytest
import torch

from tinymoe import LLM, SamplingParams, Settings
from tinymoe.engine import cpu_share
from tinymoe.engine.cpu_share import ThreadGovernor

HZ = 100


class Machine:
    """A fake clock and /proc: `run(seconds, ours=cores busy for us, others=...)`."""

    def __init__(self):
        self.now, self.busy, self.ours = 0.0, 0, 0

    def run(self, seconds, ours, others):
        self.now += seconds
        self.ours += round(ours * seconds * HZ)
        self.busy += round((ours + others) * seconds * HZ)

    def governor(self, cores, interval=0.5):  # cores None: torch's count
        return ThreadGovernor(cores, interval, clock=lambda: self.now, ticks=lambda: (self.busy, self.ours),
                              ticks_per_second=HZ)


def test_a_busy_neighbour_takes_a_thread_and_gives_it_back():
    m = Machine()
    g = m.governor(2)
    m.run(0.6, ours=2, others=0)
    assert g.threads() == 2
    m.run(0.6, ours=1.5, others=1)  # a `while True` neighbour
    assert g.threads() == 1
    m.run(0.6, ours=1, others=1)
    assert g.threads() == 1
    m.run(0.6, ours=1, others=0)  # it left
    assert g.threads() == 2


def test_our_own_busy_threads_never_count():
    m = Machine()
    g = m.governor(4)
    m.run(1.0, ours=4, others=0)  # spinning or working, all four cores ours
    assert g.threads() == 4


def test_partial_load_rounds_from_four_tenths_and_keeps_one_thread():
    m = Machine()
    g = m.governor(4)
    m.run(1.0, ours=3, others=0.3)
    assert g.threads() == 4
    m.run(1.0, ours=3, others=0.5)
    assert g.threads() == 3
    m.run(1.0, ours=1, others=2.5)
    assert g.threads() == 1
    m.run(1.0, ours=1, others=9)  # never fewer than one
    assert g.threads() == 1


def test_reads_at_most_once_an_interval():
    m, reads = Machine(), []
    g = ThreadGovernor(2, 0.5, clock=lambda: m.now, ticks=lambda: reads.append(m.now) or (m.busy, m.ours),
                       ticks_per_second=HZ)
    for _ in range(8):
        m.run(0.125, ours=1, others=1)
        g.threads()
    assert reads == pytest.approx([0.0, 0.5, 1.0])
    assert g.threads() == 1


def test_without_proc_it_keeps_the_cores():
    m = Machine()
    g = ThreadGovernor(2, 0.5, clock=lambda: m.now, ticks=lambda: None, ticks_per_second=HZ)
    m.run(1.0, ours=1, others=1)
    assert g.threads() == 2


def test_only_the_cpus_we_may_run_on_count():
    stat = ("cpu  900 0 900 100 0 0 0 0 0 0\n"
            "cpu0 100 1 10 50 7 2 3 4 40 0\n"  # busy: user nice system irq softirq steal; not idle, iowait, guest
            "cpu1 200 0 20 50 0 0 0 0 0 0\n"
            "cpu2 600 0 870 0 0 0 0 0 0 0\n"
            "intr 12345 0 0\nctxt 99\n")
    assert cpu_share.busy_ticks(stat, {0, 1}) == (100 + 1 + 10 + 2 + 3 + 4) + (200 + 20)
    assert cpu_share.busy_ticks(stat, {2}) == 1470


def test_reads_this_machine():
    busy, ours = cpu_share._ticks()  # Linux CI: both files are there
    assert busy >= ours >= 0


def test_a_new_governor_starts_from_the_count_before_any_governor_lowered_it(restored, monkeypatch):
    torch.set_num_threads(2)
    m = Machine()
    first = m.governor(None)
    assert first.cores == first.threads() == 2  # within the first interval: the cores
    m.run(0.6, ours=1.5, others=1)
    first.apply()
    assert torch.get_num_threads() == 1
    assert ThreadGovernor().cores == 2  # not the 1 the busy neighbour left behind
    torch.set_num_threads(3)  # the user's own change wins
    assert ThreadGovernor().cores == 3


@pytest.mark.parametrize("fixed", [None, 1])
def test_the_engine_steps_with_the_governors_count_unless_threads_are_fixed(fixed, monkeypatch, restored):
    llm = LLM("tiny", settings=Settings(threads=fixed))
    if fixed is None:
        assert llm._governor is not None
        monkeypatch.setattr(llm._governor, "threads", lambda: 1)
    else:
        assert llm._governor is None
    torch.set_num_threads(2)
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3
    assert torch.get_num_threads() == (1 if fixed is None else 2)

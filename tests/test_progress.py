"""tinymoe.progress.bar: a normal tqdm on a terminal, about one plain line per tenth in a log."""
import io
import re

import pytest

from tinymoe.progress import bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def count(line: str) -> int:
    return int(re.search(r"(\d+)/\d+ \[", line).group(1))


def lines_of(stream) -> list[str]:
    text = stream.getvalue()
    assert "\r" not in text and (not text or text.endswith("\n"))
    return text.splitlines()


@pytest.mark.parametrize("total, step", [(1152, 1), (1152, 5), (400, 1), (7, 1), (10, 3)])
def test_a_log_gets_a_line_per_tenth_and_the_final_count(total, step):
    log = io.StringIO()
    with bar(total=total, desc="bench", unit="pass", file=log) as b:
        done = 0
        while done < total:
            b.update(min(step, total - done))
            done += min(step, total - done)
    lines = lines_of(log)
    assert 2 <= len(lines) <= 11  # 0%, each further tenth reached, the end
    assert lines[0].startswith("bench:   0%") and f"0/{total}" in lines[0]
    assert lines[-1].startswith("bench: 100%") and f"{total}/{total}" in lines[-1]
    counts = [count(line) for line in lines]
    assert counts == sorted(set(counts))  # no line repeats a count (tqdm's closing redraw is dropped)


def test_a_log_gets_the_end_of_an_iterable_and_only_the_count_lines():
    log = io.StringIO()
    assert list(bar(range(400), desc="eval", file=log)) == list(range(400))
    lines = lines_of(log)
    assert len(lines) == 11 and "400/400" in lines[-1]
    assert [count(line) for line in lines] == list(range(0, 401, 40))


def test_a_log_without_a_total_gets_its_first_and_last_line():
    log = io.StringIO()
    for _ in bar((i for i in range(500)), desc="gen", file=log):
        pass
    lines = lines_of(log)
    assert len(lines) == 2 and lines[0].startswith("gen: 0it") and lines[1].startswith("gen: 500it")


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    with bar(total=10, file=log, disable=True) as b:
        b.update(10)
    assert log.getvalue() == ""


def test_a_terminal_gets_tqdm_as_usual():
    term = Terminal()
    with bar(total=50, desc="load", file=term) as b:
        assert b.fp is not None and b.miniters == 0 and b.mininterval == 0.1  # tqdm's own cadence
        for _ in range(50):
            b.update(1)
    text = term.getvalue()
    assert text.startswith("\r") and "load:" in text  # redrawn in place, cleared at the end (leave=False)
    assert "\n" not in text
    kept = Terminal()
    with bar(total=3, desc="gen", file=kept, leave=True) as b:
        b.update(3)
    assert kept.getvalue().endswith("\n") and "3/3" in kept.getvalue()

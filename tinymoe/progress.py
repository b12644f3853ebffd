"""Progress bars that suit where they are written: a live bar on a terminal, a few plain lines in
a log. Off a terminal tqdm would write a carriage-return update for every step; here it writes
one line per tenth of the total (about 11 lines a bar, 0% and 100% included)."""
import math
import sys

from tqdm import tqdm

LOG_LINES = 10  # a bar in a log writes a line each time it passes another 1/LOG_LINES of its total
LOG_SECONDS = 60  # without a known total: at most one line this often


class _Lines:
    """The stream tqdm writes to off a terminal: each redraw becomes one plain line, and a redraw
    that shows the same counts as the line before (tqdm's closing redraw) is dropped."""

    def __init__(self, stream):
        self.stream, self.last = stream, None
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str):
        line = text.replace("\r", "").rstrip()
        counts = line.rsplit(" [", 1)[0]  # without the elapsed time and rate
        if line and counts != self.last:
            self.stream.write(line + "\n")
            self.last = counts

    def flush(self):
        getattr(self.stream, "flush", lambda: None)()


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar(iterable=None, total=None, desc=None, unit="it", leave=False, disable=False, file=None) -> tqdm:
    """A tqdm on `file` (default: stderr at the time of the call). On a terminal: tqdm as usual,
    cleared when done unless `leave`. Elsewhere: a line at 0%, at each further tenth, and at the
    end (always kept, so a log shows where it stopped)."""
    file = sys.stderr if file is None else file
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if _is_tty(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, file=file)
    step = math.ceil(total / LOG_LINES) if total else None
    # A fixed miniters with no time limit; maxinterval=inf keeps tqdm's monitor thread from
    # switching such a bar back to a line for every update after 10 s without one.
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=True, disable=disable,
                file=_Lines(file), miniters=step or 1, mininterval=0 if step else LOG_SECONDS,
                maxinterval=math.inf)

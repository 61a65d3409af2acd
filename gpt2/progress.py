"""A tiny progress bar on stderr: one line redrawn with \\r, with rate and ETA.

    with Progress(total=n_bytes, desc="tokenising", unit="B") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))
"""
import sys
import time

_SCALES = ((1e9, "G"), (1e6, "M"), (1e3, "k"))


def _human(n):
    """1234567 -> '1.23M'; small numbers stay as integers."""
    for factor, suffix in _SCALES:
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"


def _clock(seconds):
    if seconds != seconds or seconds == float("inf"):     # NaN or unknown
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Counts work done out of `total` and redraws at most every `min_interval` seconds.

    total may be None (unknown): then only the count, rate and elapsed time are shown.
    disable=True turns every call into a no-op (for tests and quiet runs).
    """

    def __init__(self, total=None, desc="", unit="it", file=None, min_interval=0.1, width=24,
                 disable=False):
        if total is not None and total < 0:
            raise ValueError(f"Progress total must be >= 0 or None, got {total!r}")
        self.total = total
        self.desc = desc
        self.unit = unit
        self.file = file if file is not None else sys.stderr
        self.min_interval = min_interval
        self.width = width
        self.disable = disable
        self.n = 0
        self.start = time.perf_counter()
        self._last_draw = float("-inf")
        self._closed = False
        self._last_len = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n=1):
        self.n += n
        if self.disable:
            return
        now = time.perf_counter()
        if now - self._last_draw >= self.min_interval:
            self._draw(now)

    def format(self, now=None):
        """The current line, without the leading \\r."""
        elapsed = (now if now is not None else time.perf_counter()) - self.start
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        rate_text = f"{_human(rate)} {self.unit}/s" if rate == rate else f"? {self.unit}/s"
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            frac = min(self.n / self.total, 1.0)
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            remaining = (self.total - self.n) / rate if rate and rate == rate else float("nan")
            return (f"{head}{frac * 100:5.1f}% |{bar}| {_human(self.n)}/{_human(self.total)} "
                    f"{self.unit} [{_clock(elapsed)}<{_clock(max(remaining, 0.0))}, {rate_text}]")
        return f"{head}{_human(self.n)} {self.unit} [{_clock(elapsed)}, {rate_text}]"

    def _draw(self, now):
        line = self.format(now)
        pad = " " * max(self._last_len - len(line), 0)       # wipe a longer previous line
        self.file.write("\r" + line + pad)
        self.file.flush()
        self._last_len = len(line)
        self._last_draw = now

    def close(self):
        if self._closed:
            return
        self._closed = True
        if not self.disable:
            self._draw(time.perf_counter())
            self.file.write("\n")
            self.file.flush()

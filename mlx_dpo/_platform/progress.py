"""Progress for long work: a bar in a terminal, plain periodic lines in logs.

A tqdm bar (rate and time left) where stderr is a terminal; where it is not
(CI, ``nohup``, a log file) carriage-return bars make unreadable logs, so a
plain line with the same figures is printed every ``interval`` seconds and at
the end instead.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import mlx.core as mx


def rank0_print(*args) -> None:
    """``print`` on the first process only (``mlx.launch`` runs several), flushed at once."""
    if mx.distributed.init().rank() == 0:
        print(*args, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """``update()`` as work is done, ``write()`` for messages, ``close()`` at the end."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 interval: float = 30.0, tty: Optional[bool] = None, leave: bool = True):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.enabled, self.interval = enabled, interval
        self.start_n, self.start = initial, time.perf_counter()
        self.last_print = self.start
        self.bar = None
        tty = sys.stderr.isatty() if tty is None else tty
        if enabled and tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = _duration(left) if left == left else "?"
        return f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%), {rate:.2f} {self.unit}/s, {_duration(elapsed)} elapsed, {eta} left"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last_print >= self.interval:
            self.last_print = time.perf_counter()
            print(self.line(), flush=True)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n > self.start_n:
            print(self.line(), flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

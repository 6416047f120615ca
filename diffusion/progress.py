"""Progress lines for long work: how much is done, how fast, and when it will end."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator


def hms(seconds: float) -> str:
    """Seconds as h:mm:ss ("?" when not finite)."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def progress(batches: Iterator, total: int, batch_size: int, what: str,
             every_seconds: float = 30.0) -> Iterator:
    """Passes batches through, printing how many of `total` are done now and then (and at the
    end): "  <what>: done/total  rate/s  ETA h:mm:ss"."""
    t0 = last = time.time()
    done = 0
    for batch in batches:
        yield batch
        done = min(total, done + batch_size)
        now = time.time()
        if now - last >= every_seconds or done == total:
            rate = done / max(now - t0, 1e-9)
            print(f"  {what}: {done}/{total}  {rate:.1f}/s  ETA {hms((total - done) / rate)}",
                  flush=True)
            last = now

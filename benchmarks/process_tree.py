"""Peak memory of this process and all its descendants (workers, and a Ray cluster it started), sampled
in a background thread. Imported by the code the benchmarks run in fresh interpreters."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil


def peak_memory_sampler(pss: bool = False, every: float = 0.05) -> Callable[[], float]:
    """Start sampling; the returned function gives the peak so far in MiB. RSS counts a page shared by
    several processes once per process; PSS (`pss=True`, slower to read) splits it between them."""
    peak = 0

    def sample() -> None:
        nonlocal peak
        me = psutil.Process()
        while True:
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss if pss else process.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
            time.sleep(every)

    threading.Thread(target=sample, daemon=True).start()
    return lambda: peak / 2**20


def peak_memory_by_process(every: float = 0.05) -> Callable[[], dict[str, float]]:
    """Start sampling RSS; the returned function gives, in MiB, the peak of this process (`driver`), the
    largest peak of any one descendant (`worker`) and the peak of all of them together (`total`)."""
    peaks = {"driver": 0, "worker": 0, "total": 0}

    def sample() -> None:
        me = psutil.Process()
        while True:
            driver = me.memory_info().rss
            workers = []
            for process in me.children(recursive=True):
                try:
                    workers.append(process.memory_info().rss)
                except psutil.Error:
                    pass
            peaks["driver"] = max(peaks["driver"], driver)
            peaks["worker"] = max(peaks["worker"], max(workers, default=0))
            peaks["total"] = max(peaks["total"], driver + sum(workers))
            time.sleep(every)

    threading.Thread(target=sample, daemon=True).start()
    return lambda: {name: value / 2**20 for name, value in peaks.items()}

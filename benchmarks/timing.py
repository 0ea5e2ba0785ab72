"""The timing speed.py and step_profile.py share."""

import statistics
import time


def median_seconds(fn, steps):
    """The median wall time in seconds of `steps` calls of `fn`, after two warm-up calls (the
    first traces and compiles, the second settles caches)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

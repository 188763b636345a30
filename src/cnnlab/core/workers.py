"""Work spread over processes, stopped at once by a signal."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

from cnnlab.core import signals


def process_map(fn, jobs: list, workers: int) -> list:
    """[fn(job) for job in jobs], in `workers` processes when there is more than one job.

    The workers ignore SIGINT/SIGTERM (a terminal's Ctrl-C reaches them too): the parent stops,
    cancels the jobs not yet started, and does not wait for the queue to drain.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    pool = ProcessPoolExecutor(workers, initializer=signals.ignore_in_worker)
    try:
        out = list(pool.map(fn, jobs))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return out

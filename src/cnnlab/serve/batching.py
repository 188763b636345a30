"""Requests that reach a worker together share one model call.

Under load, several connections' requests are read in the same turn of the event loop. Each one's
image is decoded, then waits in `waiting`; the first to wait schedules one run of the model on the
event loop's next turn, after every request already read has been parsed and decoded and joined it.
A lone request waits for nothing: its batch of one runs on the next turn. A small network costs far
less per image in a batch than in a call of its own (per-call overhead, small GEMMs), so the same
cores answer more requests. Only models fast enough to run on the event loop are batched here (the
app decides); a slow one runs in a worker thread, one request per call.
"""

from __future__ import annotations

import asyncio

import numpy as np


class Batcher:
    def __init__(self, predict_arrays, max_batch: int):
        self.predict_arrays, self.max_batch = predict_arrays, max_batch
        self.waiting: list[tuple[np.ndarray, asyncio.Future]] = []

    async def classify(self, array: np.ndarray) -> np.ndarray:
        """Class probabilities (K,) for one decoded image, computed in a batch with those waiting beside it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((array, future))
        if len(self.waiting) == 1:
            loop.call_soon(self._run)
        return await future

    def _run(self) -> None:
        batch, self.waiting = self.waiting[:self.max_batch], self.waiting[self.max_batch:]
        if self.waiting:  # more than a batch waited: the rest go on the next turn
            asyncio.get_running_loop().call_soon(self._run)
        batch = [(array, future) for array, future in batch if not future.done()]  # done: its client went away
        if not batch:
            return
        try:
            probs = self.predict_arrays([array for array, _ in batch])
        except Exception as e:  # every request of the batch gets the error its own call would have raised
            for _, future in batch:
                future.set_exception(e)
            return
        for (_, future), p in zip(batch, probs):
            future.set_result(p)

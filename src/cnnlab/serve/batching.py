"""Requests that reach a worker together share one model call.

Under load, several connections' requests are read in the same turn of the event loop. Each one's
image is decoded, then waits in `waiting`; the first to wait schedules one run of the model behind
the callbacks already queued, so the requests whose turn comes before it join its batch (those woken
later wait for the next one: batching here is opportunistic, never a timer). A lone request waits
for nothing. A small network costs far less per image in a batch than in a call of its own (per-call
overhead, small GEMMs), so the same cores answer more requests. Only models fast enough to run on
the event loop are batched (the app decides), and a batch is capped so that it holds the loop for
about as long as `max_seconds`; a slow model runs in a worker thread, one request per call.
"""

from __future__ import annotations

import asyncio

import numpy as np


class Batcher:
    def __init__(self, predict_arrays, max_batch: int, image_seconds: float = 0.0, max_seconds: float = 0.01,
                 observe=lambda size: None):
        """`image_seconds`: the model's time for one image, which caps a batch at `max_seconds` of it;
        `observe(size)` is told each model call's number of images (the server's /metrics)."""
        self.predict_arrays, self.observe = predict_arrays, observe
        self.max_batch = max(1, min(max_batch, int(max_seconds / image_seconds) if image_seconds > 0 else max_batch))
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
        self.observe(len(batch))
        try:
            probs = self.predict_arrays([array for array, _ in batch])
        except Exception as e:  # every request of the batch gets the error its own call would have raised
            for _, future in batch:
                future.set_exception(e)
            return
        for (_, future), p in zip(batch, probs):
            future.set_result(p)

"""The server's batcher: requests that wait together go through one model call, and each gets its own
image's answer (or its error); a lone request is not held back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cnnlab.serve.batching import Batcher


class _Model:
    """Answers each image with its own first pixel, and records the size of every call."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, arrays):
        self.calls.append(len(arrays))
        if self.fail_on is not None and any(a[0] == self.fail_on for a in arrays):
            raise ValueError("bad batch")
        return np.array([[float(a[0]), 1.0 - float(a[0])] for a in arrays])


def _images(n):
    return [np.array([k / 100], np.float32) for k in range(n)]


def test_requests_waiting_together_share_one_call_and_get_their_own_answers():
    model = _Model()

    async def main():
        batcher = Batcher(model, max_batch=64)
        return await asyncio.gather(*(batcher.classify(im) for im in _images(7)))

    answers = asyncio.run(main())
    assert model.calls == [7]
    assert [round(a[0], 4) for a in answers] == [k / 100 for k in range(7)]


def test_more_than_a_batch_is_split_and_a_lone_request_runs_at_once():
    model = _Model()

    async def main():
        batcher = Batcher(model, max_batch=4)
        many = await asyncio.wait_for(asyncio.gather(*(batcher.classify(im) for im in _images(10))), timeout=5)
        one = await asyncio.wait_for(batcher.classify(_images(1)[0]), timeout=1)
        return many, one

    many, one = asyncio.run(main())
    assert model.calls == [4, 4, 2, 1]
    assert [round(a[0], 4) for a in many] == [k / 100 for k in range(10)] and one[0] == 0.0


def test_an_error_reaches_every_request_of_its_batch_and_a_cancelled_one_is_skipped():
    model = _Model(fail_on=np.float32(0.01))

    async def main():
        batcher = Batcher(model, max_batch=64)
        tasks = [asyncio.ensure_future(batcher.classify(im)) for im in _images(3)]
        await asyncio.sleep(0)  # all three wait now
        tasks[2].cancel()  # its client went away
        results = await asyncio.gather(*tasks, return_exceptions=True)
        later = await batcher.classify(np.array([0.5], np.float32))  # the batcher still works
        return results, later

    results, later = asyncio.run(main())
    assert [type(r).__name__ for r in results] == ["ValueError", "ValueError", "CancelledError"]
    assert model.calls == [2, 1] and later[0] == pytest.approx(0.5)  # the cancelled image was never run


def test_a_batch_holds_the_event_loop_for_about_max_seconds_of_the_model():
    model, sizes = _Model(), []

    async def main():
        batcher = Batcher(model, max_batch=64, image_seconds=0.004, max_seconds=0.01, observe=sizes.append)
        return await asyncio.wait_for(asyncio.gather(*(batcher.classify(im) for im in _images(5))), timeout=5)

    answers = asyncio.run(main())
    assert model.calls == sizes == [2, 2, 1]  # 0.01 s of a 0.004 s model: 2 images a call
    assert [round(a[0], 4) for a in answers] == [k / 100 for k in range(5)]

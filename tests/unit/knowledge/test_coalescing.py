"""The coalescer's batching: who goes out alone, who waits, and how batches end."""

from __future__ import annotations

import asyncio

import pytest

from app.knowledge.coalescing import Coalescer


class RecordingSend:
    """Records each batch and blocks it until ``release`` is set, so tests control what is in flight."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.fail_with: Exception | None = None

    async def __call__(self, key: str, items: list[int]) -> list[str]:
        self.batches.append((key, list(items)))
        self.started.set()
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [f"{key}:{item}" for item in items]


async def test_lone_item_is_sent_at_once():
    send = RecordingSend()
    coalescer = Coalescer(send, max_batch=8)

    pending = asyncio.ensure_future(coalescer.submit("a", 1))
    await send.started.wait()

    assert send.batches == [("a", [1])]
    send.release.set()
    assert await pending == "a:1"


async def test_items_wait_for_the_request_in_flight():
    send = RecordingSend()
    coalescer = Coalescer(send, max_batch=8)
    first = asyncio.ensure_future(coalescer.submit("a", 0))
    await send.started.wait()

    waiting = [asyncio.ensure_future(coalescer.submit("a", item)) for item in range(1, 6)]
    await asyncio.sleep(0)

    assert send.batches == [("a", [0])]
    assert coalescer.pending("a") == 5
    send.release.set()
    assert await first == "a:0"
    assert await asyncio.gather(*waiting) == [f"a:{item}" for item in range(1, 6)]
    assert send.batches == [("a", [0]), ("a", [1, 2, 3, 4, 5])]
    assert coalescer.pending("a") == 0


async def test_batches_stop_at_max_batch():
    send = RecordingSend()
    send.release.set()
    coalescer = Coalescer(send, max_batch=4)

    results = await asyncio.gather(*(coalescer.submit("a", item) for item in range(10)))

    assert results == [f"a:{item}" for item in range(10)]
    assert [len(items) for _, items in send.batches] == [4, 4, 2]


async def test_keys_are_batched_apart():
    send = RecordingSend()
    send.release.set()
    coalescer = Coalescer(send, max_batch=8)

    results = await asyncio.gather(
        coalescer.submit("a", 1), coalescer.submit("b", 2), coalescer.submit("a", 3)
    )

    assert results == ["a:1", "b:2", "a:3"]
    assert sorted(send.batches) == [("a", [1, 3]), ("b", [2])]


async def test_second_request_in_flight_sends_at_once():
    send = RecordingSend()
    coalescer = Coalescer(send, max_batch=8, max_in_flight=2)
    first = asyncio.ensure_future(coalescer.submit("a", 1))
    await send.started.wait()

    second = asyncio.ensure_future(coalescer.submit("a", 2))
    await asyncio.sleep(0)
    third = asyncio.ensure_future(coalescer.submit("a", 3))
    await asyncio.sleep(0)

    assert send.batches == [("a", [1]), ("a", [2])]
    assert coalescer.pending("a") == 1
    send.release.set()
    assert await asyncio.gather(first, second, third) == ["a:1", "a:2", "a:3"]
    assert send.batches[2] == ("a", [3])


async def test_failure_reaches_every_item_of_the_batch():
    send = RecordingSend()
    coalescer = Coalescer(send, max_batch=8)
    first = asyncio.ensure_future(coalescer.submit("a", 0))
    await send.started.wait()
    batched = [asyncio.ensure_future(coalescer.submit("a", item)) for item in (1, 2)]
    await asyncio.sleep(0)
    send.fail_with = ConnectionError("server gone")

    send.release.set()
    outcomes = await asyncio.gather(first, *batched, return_exceptions=True)

    assert [type(outcome) for outcome in outcomes] == [ConnectionError] * 3
    assert send.batches == [("a", [0]), ("a", [1, 2])]


async def test_cancelled_caller_is_left_out():
    send = RecordingSend()
    coalescer = Coalescer(send, max_batch=8)
    first = asyncio.ensure_future(coalescer.submit("a", 0))
    await send.started.wait()
    cancelled = asyncio.ensure_future(coalescer.submit("a", 1))
    remaining = asyncio.ensure_future(coalescer.submit("a", 2))
    await asyncio.sleep(0)

    cancelled.cancel()
    send.release.set()

    assert await first == "a:0"
    assert await remaining == "a:2"
    assert cancelled.cancelled()
    assert send.batches == [("a", [0]), ("a", [2])]


async def test_wrong_result_count_is_an_error():
    async def short(key: str, items: list[int]) -> list[str]:
        return [key]

    coalescer = Coalescer(short, max_batch=8)

    with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
        await asyncio.gather(coalescer.submit("a", 1), coalescer.submit("a", 2))


@pytest.mark.parametrize(
    ("max_batch", "max_in_flight", "window_seconds"), [(0, 1, 0.0), (1, 0, 0.0), (1, 1, -1.0)]
)
def test_invalid_limits_are_rejected(max_batch, max_in_flight, window_seconds):
    with pytest.raises(ValueError, match="invalid coalescing limits"):
        Coalescer(
            RecordingSend(), max_batch=max_batch, max_in_flight=max_in_flight, window_seconds=window_seconds
        )


async def test_window_gathers_items_before_the_first_request():
    send = RecordingSend()
    send.release.set()
    coalescer = Coalescer(send, max_batch=8, window_seconds=0.5)

    first = asyncio.ensure_future(coalescer.submit("a", 1))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(coalescer.submit("a", 2))

    assert await asyncio.gather(first, second) == ["a:1", "a:2"]
    assert send.batches == [("a", [1, 2])]

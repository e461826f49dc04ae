"""The micro-batcher: grouping, isolation of failures, shutdown. Pure threads, no services."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker.batching import BatcherClosed, BatchStats, MicroBatcher


class GatedDouble:
    """A batch function that records its batches and can be held at a gate."""

    def __init__(self, fail_on: object = None) -> None:
        self.batches: list[list[object]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[object]) -> list[object]:
        self.batches.append(list(items))
        self.entered.set()
        assert self.gate.wait(10), "test never opened the gate"
        if self.fail_on in items:
            raise ValueError(f"cannot handle {self.fail_on}")
        return [item * 2 for item in items]  # type: ignore[operator]


def test_concurrent_callers_each_get_their_own_result() -> None:
    stats: list[BatchStats] = []
    with MicroBatcher(
        lambda items: [i * i for i in items], max_batch=8, max_wait_s=0.005, on_batch=stats.append
    ) as batcher, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(batcher, range(200)))
    assert results == [i * i for i in range(200)]
    assert sum(s.size for s in stats) == 200
    assert max(s.size for s in stats) <= 8


def test_items_waiting_during_a_call_form_full_batches() -> None:
    fn = GatedDouble()
    batcher = MicroBatcher(fn, max_batch=4, max_wait_s=0.0)
    first = batcher.submit(0)
    assert fn.entered.wait(5)
    rest = [batcher.submit(i) for i in range(1, 8)]  # queued while the first call runs
    fn.gate.set()
    assert [f.result(5) for f in [first, *rest]] == [i * 2 for i in range(8)]
    assert fn.batches == [[0], [1, 2, 3, 4], [5, 6, 7]]
    batcher.close()


def test_a_lone_item_is_not_held_back_waiting_for_company() -> None:
    with MicroBatcher(lambda items: [str(i) for i in items], max_batch=1000, max_wait_s=0.01) as batcher:
        assert batcher.submit(7).result(timeout=5) == "7"


def test_an_urgent_item_runs_without_waiting_for_company() -> None:
    with MicroBatcher(lambda items: [str(i) for i in items], max_batch=1000, max_wait_s=3600) as batcher:
        assert batcher.submit(7, urgent=True).result(timeout=30) == "7"


def test_an_urgent_item_ends_the_wait_of_the_batch_it_joins() -> None:
    fn = GatedDouble()
    batcher = MicroBatcher(fn, max_batch=8, max_wait_s=3600)
    first = batcher.submit(0, urgent=True)
    assert fn.entered.wait(5)
    # Queued during the call: the next batch starts with a patient item, then an urgent one arrives.
    rest = [batcher.submit(1), batcher.submit(2), batcher.submit(3, urgent=True), batcher.submit(4)]
    fn.gate.set()
    assert [f.result(30) for f in [first, *rest]] == [0, 2, 4, 6, 8]
    assert fn.batches == [[0], [1, 2, 3, 4]]
    batcher.close()


def test_a_failing_batch_fails_only_its_own_callers() -> None:
    fn = GatedDouble(fail_on="bad")
    batcher = MicroBatcher(fn, max_batch=2, max_wait_s=0.0)
    blocker = batcher.submit(1)
    assert fn.entered.wait(5)
    doomed = [batcher.submit("bad"), batcher.submit(3)]
    survivor = batcher.submit(4)
    fn.gate.set()
    assert blocker.result(5) == 2
    for future in doomed:
        with pytest.raises(ValueError, match="cannot handle bad"):
            future.result(5)
    assert survivor.result(5) == 8
    batcher.close()


def test_a_wrong_number_of_results_is_an_error_not_a_mismatch() -> None:
    with (
        MicroBatcher(lambda items: items[:-1], max_batch=4, max_wait_s=0.0) as batcher,
        pytest.raises(RuntimeError, match="returned 0 results for 1 items"),
    ):
        batcher.submit("x").result(5)


def test_close_finishes_what_was_submitted_then_refuses_new_work() -> None:
    fn = GatedDouble()
    batcher = MicroBatcher(fn, max_batch=3, max_wait_s=0.0)
    futures = [batcher.submit(0)]
    assert fn.entered.wait(5)
    futures += [batcher.submit(i) for i in range(1, 6)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    fn.gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert [f.result(0) for f in futures] == [i * 2 for i in range(6)]
    with pytest.raises(BatcherClosed):
        batcher.submit(9)

"""SegmentBudget alone: which pooled segment a step gets."""

import threading

import pytest

from helpers import wait_until
from stager.daemon.memory import PENDING, SegmentBudget
from stager.protocol import ErrorCode, StagerError

pytestmark = pytest.mark.fast  # the fast tier: no daemon process, no torch.distributed job


class FakeSegment:
    def __init__(self, name, size):
        self.name, self.size = name, size

    def busy(self):
        return False

    def unlink(self):
        pass


def test_steps_get_pooled_segments_in_the_order_they_were_created():
    names = iter(f"s{i}" for i in range(10))
    budget = SegmentBudget(100, FakeSegment, lambda: next(names))
    budget.current_layout = "L1"
    assert budget.take("L1", 10) is PENDING  # the first one is created in the background
    budget.prefill("L1", 10, 3)  # the rotation: two more
    assert budget.live("L1") == ["s0", "s1", "s2"]  # what ranks are told, in the order they pre-fault them
    wait_until(lambda: budget.collect() >= 0 and not budget.pending)  # all three created and pooled
    assert [budget.take("L1", 10).name for _ in range(3)] == ["s0", "s1", "s2"]
    budget.close()


def test_spare_segments_use_free_memory_only_and_go_first_when_a_step_needs_it():
    names = iter(f"s{i}" for i in range(10))
    budget = SegmentBudget(100, FakeSegment, lambda: next(names))
    budget.current_layout, budget.spare_layout, budget.spare_rotation = "T", "W", 2
    budget.prefill("T", 20, 2)  # the trainer has 2 of its 3 segments of 20 bytes: 20 more are its own
    budget.rotation = 3
    wait_until(lambda: budget.collect() >= 0 and not budget.pending)
    trainer = [budget.take("T", 20) for _ in range(2)]
    assert budget.trainer_headroom() == 20 and budget.used == 40
    assert budget.request_spare("W", 50) is False and budget.used == 40  # would eat the trainer's third segment
    assert budget.request_spare("W", 40) is PENDING and budget.used == 80  # counted before it exists
    assert budget.request_spare("W", 40) is PENDING and budget.used == 80  # the one being created, not another
    wait_until(lambda: budget.collect() >= 0 and not budget.pending)
    spare = budget.request_spare("W", 40)
    assert spare.name == "s2" and budget.used == 80
    budget.give_back(spare, reuse=True)  # pooled for the next whole version
    assert budget.used == 80 and budget.request_spare("W", 40) is spare
    budget.give_back(spare, reuse=True)
    for seg in trainer:  # a new trainer layout needs 70: the spare pool is dropped for it
        budget.destroy(seg)
    assert budget.take("T2", 70) is PENDING and "s2" not in budget.owner and budget.used == 70
    budget.close()


def test_a_spare_segment_that_cannot_be_created_is_said_once_and_given_back():
    class Failing(FakeSegment):
        def __init__(self, name, size):
            raise OSError("no room")

    budget = SegmentBudget(100, Failing, lambda: "s0")
    budget.spare_layout = "W"
    assert budget.request_spare("W", 40) is PENDING
    wait_until(lambda: budget.collect() >= 0 and not budget.pending)
    with pytest.raises(StagerError, match="no room") as info:
        budget.request_spare("W", 40)
    assert info.value.code == ErrorCode.MEMORY_LIMIT and budget.used == 0
    budget.close()


class FakePreallocatable(FakeSegment):
    """A fake segment that says whose pages it took over; preallocating one waits for ``allocating``
    to be set (as a real one takes a while), so a test sees the budget while it is in progress."""

    allocating = threading.Event()

    def __init__(self, name, size, pages_from=None):
        super().__init__(name, size)
        self.pages_from = pages_from.name if pages_from is not None else None
        self.unlinked = False

    @classmethod
    def preallocated(cls, name, size, stop=None):
        assert cls.allocating.wait(30), "the test never let the preallocation finish"
        return cls(name, size)

    def unlink(self):
        self.unlinked = True


@pytest.fixture(autouse=True)
def _preallocation_runs():
    FakePreallocatable.allocating.set()  # unless a test holds it back
    yield
    FakePreallocatable.allocating.set()


def _ready(budget):
    wait_until(lambda: budget.collect() >= 0 and not budget.creating)


def _with_reserve(limit, size, *, started=True):
    """A budget of ``limit`` for layout "L" that preallocates ``size`` (done, unless not ``started``:
    then still in progress until the test sets ``FakePreallocatable.allocating``)."""
    names = iter(f"s{i}" for i in range(10))
    budget = SegmentBudget(limit, FakePreallocatable, lambda: next(names))
    budget.current_layout = "L"
    if not started:
        FakePreallocatable.allocating.clear()
    budget.preallocate(size)
    if started:
        _ready(budget)
    return budget


def test_preallocated_memory_counts_and_the_first_segment_that_fits_takes_its_pages():
    names = iter(f"s{i}" for i in range(10))
    budget = SegmentBudget(100, FakePreallocatable, lambda: next(names))
    budget.current_layout = "L"
    budget.preallocate(60)
    assert budget.used == 60  # counted from the moment it is asked for
    _ready(budget)
    assert budget.reserve.name == "s0" and budget.used == 60
    assert budget.take("L", 50) is PENDING
    assert budget.reserve is None and budget.used == 50  # the segment's 50, not the 60 preallocated
    _ready(budget)
    seg = budget.take("L", 50)
    assert seg.name == "s1" and seg.pages_from == "s0"
    budget.close()


def test_preallocated_memory_too_small_for_a_step_is_given_back_to_it():
    budget = _with_reserve(100, 40)
    reserve = budget.reserve
    assert budget.take("L", 70) is PENDING  # 40 + 70 > 100, and 40 cannot hold 70: given back
    assert reserve.unlinked and budget.reserve is None and budget.used == 70
    _ready(budget)
    assert budget.take("L", 70).pages_from is None
    budget.close()


def test_a_reserve_too_small_for_the_layout_makes_way_for_its_rotation():
    budget = _with_reserve(100, 20)
    reserve = budget.reserve
    assert budget.take("L", 30) is PENDING  # fits beside the reserve: 50 used
    budget.prefill("L", 30, 3)  # the rotation's two more need 60: the reserve (20) goes
    assert reserve.unlinked and budget.reserve is None and budget.used == 90
    assert len(budget.live("L")) == 3
    budget.close()


def test_a_step_that_fits_the_memory_being_preallocated_waits_for_it():
    budget = _with_reserve(200, 60, started=False)
    assert budget.take("L", 50) is PENDING and not budget.pending  # nothing new asked for: it waits
    FakePreallocatable.allocating.set()
    _ready(budget)
    assert budget.take("L", 50) is PENDING and budget.reserve is None and budget.used == 50
    _ready(budget)
    assert budget.take("L", 50).pages_from == "s0"
    budget.close()


def test_a_step_waits_for_memory_being_preallocated_instead_of_being_refused():
    budget = _with_reserve(100, 80, started=False)
    assert budget.take("L", 50) is PENDING  # not None (which refuses or evicts): the 80 come back
    FakePreallocatable.allocating.set()
    _ready(budget)
    assert budget.take("L", 50) is PENDING and budget.reserve is None and budget.used == 50
    budget.close()


def test_close_gives_preallocated_memory_back():
    names = iter(f"s{i}" for i in range(10))
    budget = SegmentBudget(100, FakePreallocatable, lambda: next(names))
    budget.preallocate(60)
    _ready(budget)
    reserve = budget.reserve
    budget.close()
    assert reserve.unlinked and budget.used == 0


def test_real_preallocated_segments_stop_when_asked_and_a_failed_takeover_creates_anew():
    import os
    import threading

    import pytest

    from stager.daemon.segments import Segment
    from stager.protocol import ErrorCode, StagerError
    from stager.protocol.shm import segment_name, segment_path

    names = iter(segment_name(os.getpid(), "budgettest", i) for i in range(10))
    stop = threading.Event()
    stop.set()
    with pytest.raises(StagerError) as info:  # a daemon stopping: nothing left behind
        Segment.preallocated(next(names), 1 << 20, stop)
    assert info.value.code == ErrorCode.MEMORY_LIMIT and "stopping" in info.value.message
    reserve = Segment.preallocated(next(names), 1 << 20)
    os.unlink(segment_path(reserve.name))  # gone from under the daemon (an operator's rm)
    seg = Segment(next(names), 1 << 19, pages_from=reserve)  # taking it over fails: created anew
    try:
        assert os.stat(segment_path(seg.name)).st_size == 1 << 19
        assert [n for n in os.listdir("/dev/shm") if f"-{os.getpid()}-budgette" in n] == [seg.name]  # no leftovers
    finally:
        seg.unlink()

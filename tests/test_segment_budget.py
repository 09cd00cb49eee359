"""SegmentBudget alone: which pooled segment a step gets."""

from helpers import wait_until

from stager.daemon.memory import PENDING, SegmentBudget


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
    budget.current_layout, budget.rotation, budget.spare_layout, budget.spare_rotation = "T", 3, "W", 2
    for name in ("t0", "t1"):  # the trainer has 2 of its 3 segments of 20 bytes: 20 more are its own
        budget.used += 20
        budget.adopt("T", FakeSegment(name, 20))
    assert budget.trainer_headroom() == 20
    assert budget.reserve_spare("W", 50) is False and budget.used == 40  # would eat the trainer's third segment
    assert budget.reserve_spare("W", 40) is True and budget.used == 80  # reserved: counted before it exists
    budget.unreserve(40)  # creating it failed
    assert budget.used == 40
    assert budget.reserve_spare("W", 40) is True
    budget.adopt("W", FakeSegment("w0", 40))
    budget.give_back(budget.owner["w0"][1], reuse=True)  # pooled for the next whole version
    assert budget.used == 80 and budget.reserve_spare("W", 40).name == "w0"
    budget.give_back(budget.owner["w0"][1], reuse=True)
    for name in ("t0", "t1"):  # a new trainer layout needs 70: the spare pool is dropped for it
        budget.destroy(budget.owner[name][1])
    assert budget.take("T2", 70) is PENDING and "w0" not in budget.owner and budget.used == 70
    budget.close()

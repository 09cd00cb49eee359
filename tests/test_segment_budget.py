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
    budget.current_layout, budget.spare_layout, budget.spare_rotation = "T", "W", 2
    budget.used = 60  # the trainer's rotation
    assert budget.reserve_spare("W", 50) is False  # would need the trainer's memory: not taken
    assert budget.used == 60
    assert budget.reserve_spare("W", 40) is True and budget.used == 100
    budget.adopt("W", FakeSegment("w0", 40))
    budget.give_back(budget.owner["w0"][1], reuse=True)  # pooled for the next whole version
    assert budget.reserve_spare("W", 40).name == "w0"
    budget.give_back(budget.owner["w0"][1], reuse=True)
    budget.used -= 60  # the trainer's segments went; a new trainer layout needs all 100: the spare pool goes
    assert budget.take("T2", 100) is not None and "w0" not in budget.owner
    budget.close()

"""The per-chunk state machine (cache/chunkstate.py): each transition from the states it names
only, the queries that follow from a state, and the budget share that goes with it."""

import pytest

from modelfs.cache.chunkstate import ChunkStates, IllegalTransition, State
from modelfs.cache.groupsync import UnrecordedBudget
from modelfs.cache.index import ABSENT, LANDED, VERIFIED


def states(present, budget=None):
    return ChunkStates([100] * len(present), present, budget or UnrecordedBudget(10_000))


def test_rows_become_states_and_queries():
    s = states([ABSENT, VERIFIED, LANDED])
    assert [s.state(i) for i in range(3)] == [State.ABSENT, State.RECORDED, State.LANDED]
    assert list(s.present) == [False, True, True]
    assert list(s.readable) == [False, True, False]
    assert list(s.landed) == [False, False, True]
    assert [s.in_file(i) for i in range(3)] == [False, True, True]
    assert not s.complete() and s.readable.count(False) == 2


async def test_a_verified_chunk_goes_pending_written_recorded_and_gives_its_share_back():
    budget = UnrecordedBudget(10_000)
    s = states([ABSENT, ABSENT], budget)
    await budget.admit(100)
    s.verified_pending(0, share=100)
    assert s.readable[0] and s.is_pending(0) and not s.present[0] and s.share(0) == 100
    s.written(0, generation=7)
    assert s.written_upto(6) == [] and s.written_upto(7) == [0] and budget.held == 100
    s.recorded(0)
    assert s.present[0] and s.state(0) is State.RECORDED and budget.held == 0
    assert s.written_upto(7) == [] and s.generation(0) == 7  # kept: a commit compares it


async def test_a_landed_chunk_is_checked_or_dropped():
    budget = UnrecordedBudget(10_000)
    s = states([LANDED, ABSENT, LANDED], budget)
    s.checked(0)
    assert s.readable[0] and not s.landed[0] and s.present[0]
    await budget.admit(100)
    s.landed_pending(1, share=100)
    assert s.landed[1] and not s.readable[1]
    s.written(1, generation=1)
    s.dropped(1)  # unchecked bytes that go: out of the file and of the budget
    assert not s.in_file(1) and budget.held == 0
    s.dropped(2)
    assert s.state(2) is State.ABSENT


@pytest.mark.parametrize("name, start", [
    ("written", [ABSENT]),             # nothing was pending
    ("recorded", [ABSENT]),            # never written
    ("checked", [VERIFIED]),           # only a landed chunk is checked
    ("dropped", [VERIFIED]),           # a verified chunk is evicted, never dropped
    ("evicted", [ABSENT]),             # nothing to evict
    ("write_failed", [VERIFIED]),      # no write was pending
])
def test_an_illegal_transition_is_an_error(name, start):
    s = states(start)
    with pytest.raises(IllegalTransition, match=name):
        getattr(s, name)(0, *([1] if name == "written" else []))
    assert s.state(0) is (State.ABSENT if start == [ABSENT] else State.RECORDED)


async def test_a_chunk_is_never_taken_in_twice():
    budget = UnrecordedBudget(10_000)
    s = states([ABSENT], budget)
    s.verified_pending(0, share=100)
    with pytest.raises(IllegalTransition):
        s.verified_pending(0, share=100)
    with pytest.raises(IllegalTransition):
        s.landed_pending(0, share=100)


async def test_eviction_failure_and_forgetting_give_shares_back():
    budget = UnrecordedBudget(10_000)
    s = states([ABSENT] * 4, budget)
    for i in range(4):
        await budget.admit(100)
        s.verified_pending(i, share=100)
    s.write_failed(0)
    s.written(1, generation=1)
    s.evicted(1)
    s.written(2, generation=2)
    s.uncount(2)  # nobody will record it (its commit failed): state kept, share given back
    assert s.state(2) is State.WRITTEN and s.share(2) == 0 and budget.held == 100
    s.forget_all()
    assert budget.held == 0 and not any(s.in_file(i) for i in range(4))
    assert s.written_upto(10) == []


def test_complete_follows_every_transition():
    """`complete` is counted, not scanned (it is asked on every read): after any sequence of
    legal transitions it says what the states say."""
    import random

    from modelfs.cache.chunkstate import _MOVES

    rng = random.Random(5)
    s = states([ABSENT, VERIFIED, LANDED, ABSENT, VERIFIED])
    for _ in range(2000):
        i = rng.randrange(5)
        legal = [name for name, moves in _MOVES.items() if s.state(i) in moves]
        name = rng.choice(legal + ["forget_all"])
        if name == "forget_all":
            if rng.random() < 0.05:
                s.forget_all()
        elif name in ("verified_pending", "landed_pending"):
            getattr(s, name)(i, share=0)
        elif name == "written":
            s.written(i, generation=1)
        else:
            getattr(s, name)(i)
        assert s.complete() == all(s.present)
    assert not s.complete() or all(s.present)

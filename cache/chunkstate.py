"""The state of every chunk of a blob being materialized: one state machine per chunk, one owner.

States (`State`):

    ABSENT          not in the file (never was, evicted, dropped, or its write failed)
    PENDING         verified in memory (readable, served from its buffer); its write is pending
    PENDING_LANDED  received unchecked (a blob checked as a whole, a pull); its write is pending
    WRITTEN         verified and in the file, not yet durable or recorded
    WRITTEN_LANDED  unchecked and in the file, not yet durable or recorded
    RECORDED        verified, durable, recorded in the index (VERIFIED)
    LANDED          in the file, recorded as LANDED: never verified on its own, so not
                    readable until checked (`verify_landed`, or the whole blob's seal)

Transitions (each a method; one from a state it does not name raises IllegalTransition, an
internal error: a race that would otherwise go unseen):

    verified_pending  ABSENT -> PENDING                 write_chunk took a verified chunk in
    landed_pending    ABSENT -> PENDING_LANDED          ... an unchecked one, for the seal
    written           PENDING(_LANDED) -> WRITTEN(_LANDED)    its write behind is done
    recorded          WRITTEN -> RECORDED, WRITTEN_LANDED -> LANDED    durable and recorded
    checked           LANDED -> RECORDED                its own digest (or the seal) matched
    evicted           WRITTEN*, RECORDED, LANDED -> ABSENT    its hole was punched for room
    dropped           WRITTEN_LANDED, LANDED -> ABSENT  unchecked bytes that go: corrupt, or
                                                        replaced by checked ones
    write_failed      PENDING(_LANDED) -> ABSENT        fetched again when wanted
    forget_all        any -> ABSENT                     the file and the rows are gone

What callers ask are queries of these states, not facts kept beside them: `readable` (PENDING,
WRITTEN, RECORDED: verified, may be served), `landed` (the three unchecked ones), `present`
(RECORDED, LANDED: recorded in the index), `in_file` (anything but ABSENT: in the file or on
its way there), `pending`. So a chunk can never be readable and landed at once, nor present and
not in the file.

Two more facts of a chunk live with its state, in the same per-chunk slot, because they start
and end with states:
- its share of the cache's UnrecordedBudget (`share`: the bytes of a chunk taken into the blob
  and not recorded yet, which a crash would make us fetch again). It is taken with
  verified_pending/landed_pending (after the budget admitted it: the blob does the waiting) and
  given back by every transition that leaves the unrecorded states (recorded, evicted, dropped,
  write_failed, forget_all), so no path can forget it. `uncount` gives it back without a state
  change, for a chunk nobody will record (its commit failed; the blob was retired or closed:
  its rows are another object's now).
- the GroupSync generation of its write (`generation`, set by `written`): a sync that covered
  that generation made it durable, and `written_upto` names the WRITTEN chunks a sync covered,
  to be recorded in the same trio step. The generation is kept when the chunk leaves the file,
  so a commit waiting for it sees the chunk was written again (a new generation) or not.
The pending write's buffer is not here: it is file I/O (writeback.py), and the state says only
that a write is pending.

Concurrency contract: trio thread only; nothing here awaits, so every transition is one step.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from .groupsync import UnrecordedBudget
from .index import LANDED as ROW_LANDED


class IllegalTransition(RuntimeError):
    """A chunk was moved from a state its transition does not start from (an internal error)."""


class State(enum.Enum):
    ABSENT = "absent"
    PENDING = "pending"
    PENDING_LANDED = "pending, landed"
    WRITTEN = "written"
    WRITTEN_LANDED = "written, landed"
    RECORDED = "recorded"
    LANDED = "landed"


S = State
_READABLE = frozenset({S.PENDING, S.WRITTEN, S.RECORDED})
_LANDED = frozenset({S.PENDING_LANDED, S.WRITTEN_LANDED, S.LANDED})
_PRESENT = frozenset({S.RECORDED, S.LANDED})
_PENDING = frozenset({S.PENDING, S.PENDING_LANDED})
_UNRECORDED = frozenset(State) - {S.ABSENT} - _PRESENT

# transition -> {from: to}
_MOVES = {
    "verified_pending": {S.ABSENT: S.PENDING},
    "landed_pending": {S.ABSENT: S.PENDING_LANDED},
    "written": {S.PENDING: S.WRITTEN, S.PENDING_LANDED: S.WRITTEN_LANDED},
    "recorded": {S.WRITTEN: S.RECORDED, S.WRITTEN_LANDED: S.LANDED},
    "checked": {S.LANDED: S.RECORDED},
    "evicted": {s: S.ABSENT for s in (S.WRITTEN, S.WRITTEN_LANDED, S.RECORDED, S.LANDED)},
    "dropped": {S.WRITTEN_LANDED: S.ABSENT, S.LANDED: S.ABSENT},
    "write_failed": {S.PENDING: S.ABSENT, S.PENDING_LANDED: S.ABSENT},
}


class _Slot:
    __slots__ = ("state", "share", "generation")

    def __init__(self, state: State):
        self.state, self.share, self.generation = state, 0, 0


class _View(Sequence):
    """A read-only list of one query over every chunk (`blob.present[i]`, `all(...)`)."""

    __slots__ = ("_slots", "_of")

    def __init__(self, slots: list[_Slot], of: frozenset):
        self._slots, self._of = slots, of

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [s.state in self._of for s in self._slots[i]]
        return self._slots[i].state in self._of

    def __iter__(self):
        of = self._of
        return (s.state in of for s in self._slots)

    def __repr__(self) -> str:
        return repr(list(self))


class ChunkStates:
    """The states of a blob's chunks, from the index's rows (`present`: ABSENT, VERIFIED or
    LANDED per chunk; or bools), with their shares of `budget`."""

    def __init__(self, lengths: list[int], present, budget: UnrecordedBudget):
        self._lengths = lengths
        self._budget = budget
        self._slots = [_Slot(S.LANDED if p == ROW_LANDED else S.RECORDED if p else S.ABSENT)
                       for p in present]
        assert len(self._slots) == len(lengths)
        self._written: set[int] = set()  # chunks in WRITTEN or WRITTEN_LANDED (for syncs)
        # chunks in a present state: `complete` is asked on every read, in O(1)
        self._present = sum(s.state in _PRESENT for s in self._slots)
        self.present = _View(self._slots, _PRESENT)
        self.readable = _View(self._slots, _READABLE)
        self.landed = _View(self._slots, _LANDED)

    # -- queries -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slots)

    def state(self, i: int) -> State:
        return self._slots[i].state

    def is_readable(self, i: int) -> bool:
        return self._slots[i].state in _READABLE

    def is_landed(self, i: int) -> bool:
        return self._slots[i].state in _LANDED

    def is_present(self, i: int) -> bool:
        return self._slots[i].state in _PRESENT

    def in_file(self, i: int) -> bool:
        return self._slots[i].state is not S.ABSENT

    def is_pending(self, i: int) -> bool:
        return self._slots[i].state in _PENDING

    def unrecorded(self, i: int) -> bool:
        """In the file (or on its way) and not recorded yet."""
        return self._slots[i].state in _UNRECORDED

    def complete(self) -> bool:
        return self._present == len(self._slots)

    def generation(self, i: int) -> int:
        return self._slots[i].generation

    def share(self, i: int) -> int:
        return self._slots[i].share

    def written_upto(self, generation: int) -> list[int]:
        """The WRITTEN chunks whose write a sync up to `generation` made durable."""
        return sorted(i for i in self._written if self._slots[i].generation <= generation)

    # -- transitions ---------------------------------------------------------------------------

    def verified_pending(self, i: int, share: int) -> None:
        self._take(i, "verified_pending", share)

    def landed_pending(self, i: int, share: int) -> None:
        self._take(i, "landed_pending", share)

    def written(self, i: int, generation: int) -> None:
        self._move(i, "written")
        self._slots[i].generation = generation
        self._written.add(i)

    def recorded(self, i: int) -> None:
        self._move(i, "recorded")

    def checked(self, i: int) -> None:
        self._move(i, "checked")

    def evicted(self, i: int) -> None:
        self._move(i, "evicted")

    def dropped(self, i: int) -> None:
        self._move(i, "dropped")

    def write_failed(self, i: int) -> None:
        self._move(i, "write_failed")

    def forget_all(self) -> None:
        for i, slot in enumerate(self._slots):
            slot.state = S.ABSENT
            self.uncount(i)
        self._written.clear()
        self._present = 0

    def uncount(self, i: int) -> None:
        """Give chunk `i`'s share of the budget back, its state unchanged (nobody will record
        it)."""
        slot = self._slots[i]
        if slot.share:
            self._budget.settle(slot.share)
            slot.share = 0

    def uncount_all(self) -> None:
        for i in range(len(self._slots)):
            self.uncount(i)

    def _take(self, i: int, name: str, share: int) -> None:
        slot = self._slots[i]
        if slot.share:
            raise IllegalTransition(f"chunk {i}: {name} while it holds a share already")
        self._move(i, name)
        slot.share = share

    def _move(self, i: int, name: str) -> None:
        slot = self._slots[i]
        to = _MOVES[name].get(slot.state)
        if to is None:
            raise IllegalTransition(f"chunk {i}: {name} from {slot.state.value}")
        self._present += (to in _PRESENT) - (slot.state in _PRESENT)
        slot.state = to
        self._written.discard(i)
        if to in _PRESENT or to is S.ABSENT:
            self.uncount(i)

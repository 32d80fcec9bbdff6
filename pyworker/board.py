"""What a worker's executor is running, told to its supervisor through one shared page.

The executor (the process that runs user code, worker.py) writes here when it starts a task and
when it is done with it, and, for a task its supervisor asked it to watch item by item, when
each item starts. The supervisor (supervisor.py) reads it when the executor died, to know which
task and item killed it, and while a task runs, to stop one that was cancelled or overran its
time limit.

Why shared memory and not a pipe: a write here is a few stores into memory, with no system call
and no reader to wait for, so the hot path (one task every few µs) pays almost nothing for it.
A sequence counter that is odd while a write is under way lets the reader retry instead of
taking half of one write and half of the next (a seqlock).
"""
from __future__ import annotations

import mmap
import struct
import time
from typing import NamedTuple

IDLE, RUNNING, RECYCLING, STOPPING = 0, 1, 2, 3
FIELD_BYTES = 200  # "<jid> <chunk>": a job id is at most 128 characters (protocol.check_name)

# seq, state, items in the task, item running (-1: not watched), task start, item start,
# item time limit (0: none), field length, field
_LAYOUT = struct.Struct(f"<QiqqdddI{FIELD_BYTES}s")
_SEQ = struct.Struct("<Q")
_ITEM = struct.Struct("<qd")  # item running and its start, at their offset in _LAYOUT
_ITEM_AT = struct.calcsize("<Qiq")


class Snapshot(NamedTuple):
    state: int
    n_items: int
    item: int
    started: float
    item_started: float
    item_timeout: float
    field: str


class Board:
    """One page shared by a supervisor and the executors it forks (MAP_SHARED, anonymous)."""

    def __init__(self):
        self.page = mmap.mmap(-1, mmap.PAGESIZE)
        self._seq = 0

    # --- executor side (one writer) -------------------------------------------------------------

    def _write(self, state, n_items, item, started, item_started, timeout, field: bytes):
        self._seq += 1
        _SEQ.pack_into(self.page, 0, self._seq)
        _LAYOUT.pack_into(self.page, 0, self._seq, state, n_items, item, started, item_started,
                          timeout, len(field), field)
        self._seq += 1
        _SEQ.pack_into(self.page, 0, self._seq)

    def begin(self, field: str, timeout: float = 0.0):
        """A task starts. Its item is -1 until a watched task's first item starts (and stays
        so for a task that is not watched); ``timeout`` is its items' time limit (0: none)."""
        now = time.monotonic()
        self._write(RUNNING, 0, -1, now, now, timeout, field.encode()[:FIELD_BYTES])

    def item(self, offset: int):
        """Item ``offset`` of the task starts (only for a watched task: one write per item)."""
        self._seq += 1
        _SEQ.pack_into(self.page, 0, self._seq)
        _ITEM.pack_into(self.page, _ITEM_AT, offset, time.monotonic())
        self._seq += 1
        _SEQ.pack_into(self.page, 0, self._seq)

    def end(self, state: int = IDLE):
        self._write(state, 0, -1, 0.0, 0.0, 0.0, b"")

    # --- supervisor side ------------------------------------------------------------------------

    def read(self) -> Snapshot:
        for _ in range(1000):
            seq, state, n, item, started, item_started, timeout, flen, field = \
                _LAYOUT.unpack_from(self.page, 0)
            if seq % 2 == 0 and _SEQ.unpack_from(self.page, 0)[0] == seq:
                return Snapshot(state, n, item, started, item_started, timeout,
                                field[:flen].decode(errors="replace"))
        # A writer that died mid-write leaves an odd count for ever: what is there is all
        # there will be.
        return Snapshot(state, n, item, started, item_started, timeout,
                        field[:flen].decode(errors="replace"))

    def reset(self):
        """Before a new executor starts: nothing running."""
        self._seq = _SEQ.unpack_from(self.page, 0)[0] | 1
        self._seq += 1
        _LAYOUT.pack_into(self.page, 0, self._seq, IDLE, 0, -1, 0.0, 0.0, 0.0, 0, b"")

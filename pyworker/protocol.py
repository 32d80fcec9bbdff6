"""The Redis key layout and the message formats: written down here once, used from here.

No I/O in this module. docs/protocol.md explains the same layout for people.

Keys (``P`` is the prefix, ``pyw`` by default)::

    P:jobs                list   job ids that have queued tasks, rotated for fairness between jobs
    P:wake                list   tokens that wake idle workers blocked in BLPOP (trimmed)
    P:idle                list   idle workers, the most recently idle first: a new task goes
                                 to the first (its caches are warm), through its own wake list
    P:workers             set    ids of registered workers (an id is "<name>.<instance>":
                                 two workers that report the same name are two workers)
    P:leases              zset   worker id -> the earliest Redis time (ms) its lease can have
                                 ended: the reaper looks at those due, not at every worker
    P:reaper              string the id of the worker that reaps now (SET NX, PX lease/2):
                                 one reaper at a time among the workers
    P:job:<jid>           hash   job metadata; exists while the job is alive (TTL, kept alive by
                                 the caller; its absence means cancelled, finished or abandoned)
    P:job:<jid>:q         list   queued task messages of the job
    P:job:<jid>:r         list   result messages of the job
    P:job:<jid>:rt        list   results the caller took (BLMOVE, LMOVE from :r) and has not yet
                                 acknowledged: a result whose answer was lost is found here
    P:job:<jid>:n         hash   chunk id -> how many times a worker died running it
    P:job:<jid>:p         hash   chunk id -> task payload too big to travel inline
    P:job:<jid>:rp        hash   "<chunk> <worker>" -> result payload too big to travel inline
    P:job:<jid>:o         list   what running tasks printed, sent while they run (output messages)
    P:job:<jid>:x         set    chunk ids whose calls the caller cancelled (Future.cancel): a
                                 worker running one stops it
    P:job:<jid>:k         set    workers that could not verify the job's tasks (their signing key
                                 differs): they gave them back and take no more of them
    P:fn:<sha>            string a signed, pickled function (shared by every task that uses it)
    P:worker:<id>:hb      string the worker's lease; expires when the worker stops heart-beating
    P:worker:<id>:info    hash   name (readable; not unique), host, pid, started, done, seen (for
                                 status()), lease (ms), shm (its shared-memory folder identity,
                                 shm.py; empty: none), handoff (1: it takes tasks handed over in
                                 its wake list)
    P:worker:<id>:active  hash   "<jid> <chunk>" -> the task message it is running (and the one
                                 it took ahead, if any)
    P:worker:<id>:wake    list   for this worker alone (it blocks on it and P:wake): task messages
                                 handed over by a submit (in its active hash already), or wake
                                 tokens '1' if its info has no handoff=1 (a worker from before)
    P:stats:<unix second> string items finished in that second (expires)
    P:counters            hash   running totals for the metrics exporter (metrics.py), written
                                 by the executors' beats (no command of their own):
                                 COUNTER_FIELDS, then one field per TASK_SECONDS_BUCKETS bound
                                 (tasks whose run time fell at or under it and over the bound
                                 before; 'inf': over the last)

Messages are bytes: one ASCII header line, then (for messages that carry a pickle) a 32-byte
HMAC-SHA256 over header line + payload, then the payload. A payload over INLINE_MAX_BYTES is not
inline but in the job's payload hash (flag ``r`` instead of ``i``), so Lua scripts only ever move
small strings; the signature still covers it. When caller and worker share a host (shm.py), such
a payload goes into a file in shared memory instead (flag ``s``): the signed payload is then the
segment's descriptor, ``<file name> <sha256 of the file> <stream length> [<buffer length> ...]``,
and the file holds a protocol-5 pickle stream followed by its out-of-band buffers, each on a
64-byte boundary. SHM is ``-`` or the caller's ``<directory identity>.<pid namespace>.<pid>``::

    task:   "<jid> <chunk> <fn_sha> <python major.minor> <cloudpickle version> <i|r|s> <SHM> <T> <A>\n" SIG [PAYLOAD]
    result: "<chunk> ok <worker> <i|r|s>\n" SIG [PAYLOAD]
            "<chunk> lost <dead worker> <deaths>\n" SIG        (no payload)
            "<chunk> rejected <worker> <reason...>\n" SIG      (the task verified, but its
                                                             function or segment did not)
            "<chunk> mismatch <worker> <reason...>\n" SIG      (version mismatch)
            "<chunk> resend <worker> <reason...>\n" SIG        (cannot read the task's payload: a
                                                             segment from another host is sent
                                                             again through Redis)
    fn:     SIG PAYLOAD                                      (P:fn:<sha>; sha = function_sha(PAYLOAD))
    output: "<chunk> <offset> <worker>\n" SIG TEXT             (what item <offset> printed so
                                                             far, UTF-8; sent while it runs)
    lost:   "<jid> <chunk> !lost <dead worker> <deaths>\n" TASK   (queued by the reaper, which
                                                             has no key: the worker that takes
                                                             it checks TASK and answers with a
                                                             signed 'lost' result)
    alive:  "<A> <hex HMAC>"                                 (P:job:<jid> field 'alive')

T is each item's time limit in seconds (pmap's task_timeout; 0: none). A is a unix time until
which the job is alive: a task is run only while its own A, or the job's signed 'alive' record
(renewed by the caller's keep-alive), is not past, give or take CLOCK_SKEW_S.

Every signature covers a context before the header (mac_context): the message kind, and for
results and outputs the job id, which their headers do not carry. So no signed message can be
passed off as another kind, or as another job's; task headers carry job, chunk and function.
Every message is signed, control replies included; a reader drops what does not verify.
Later versions may append fields to a task header or an ok result's; readers ignore them.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import NamedTuple

SIG_BYTES = 32
INLINE_MAX_BYTES = 128 * 1024
INLINE, BY_REF, SHARED = "i", "r", "s"
NO_SHM = "-"
WAKE_TOKENS_MAX = 1024

CLOCK_SKEW_S = 60  # how far the clocks of caller and workers may differ (task freshness)

# Signature contexts (domain separation): see mac_context.
KIND_TASK, KIND_RESULT, KIND_OUTPUT, KIND_FN, KIND_ALIVE = "task", "result", "output", "fn", "alive"

LOST_MARK = "!lost"

STATUS_OK = "ok"
STATUS_LOST = "lost"
STATUS_REJECTED = "rejected"
STATUS_MISMATCH = "mismatch"
STATUS_RESEND = "resend"

# Payload modes: how a worker applies the function to each item of a chunk.
MODE_ONE = 0  # fn(item)
MODE_STAR = 1  # fn(*item)
MODE_CALL = 2  # fn(*args, **kwargs) with item == (args, kwargs)

# P:counters' fields, in the order an executor's beat sends them (one space-separated string,
# see counter_deltas): tasks (chunks) finished, of them failed (an item raised, or the whole
# chunk failed), their items, of those failed, and the tasks' run time in microseconds (the sum
# of a Prometheus histogram); then the TASK_SECONDS_BUCKETS counts.
COUNTER_FIELDS = ("tasks", "tasks_failed", "items", "items_failed", "run_us")
# Upper bounds (s) of the task run-time histogram's buckets: from quick tasks to hour-long ones.
TASK_SECONDS_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def bucket_field(i: int) -> str:
    """The P:counters field of histogram bucket i (len(TASK_SECONDS_BUCKETS): over the last)."""
    return f"le {TASK_SECONDS_BUCKETS[i]:g}" if i < len(TASK_SECONDS_BUCKETS) else "le inf"


def counter_fields() -> list[str]:
    return list(COUNTER_FIELDS) + [bucket_field(i) for i in range(len(TASK_SECONDS_BUCKETS) + 1)]


def counter_deltas(values) -> str:
    """What a beat sends to add to P:counters: integers in counter_fields() order, zeros at the
    end left off ('' when all are zero: the beat then adds nothing)."""
    values = list(values)
    while values and not values[-1]:
        values.pop()
    return " ".join(str(int(v)) for v in values)


_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
INSTANCE_HEX = 8  # the random part of a worker id


def worker_id(name: str, instance: str | None = None) -> str:
    """A worker's id in Redis: its name and a random instance, so that two workers that report
    the same name (two ``--network host`` containers: same host name, both pid 1) never take
    each other's tasks or lease. ``name`` is checked (check_name) by the caller."""
    return f"{name}.{instance or secrets.token_hex(INSTANCE_HEX // 2)}"


def check_name(kind: str, value: str) -> str:
    """Names end up inside keys and space-separated headers, so keep them to a safe alphabet."""
    if not _ID.match(value):
        raise ValueError(
            f"invalid {kind} {value!r}: use 1-128 characters from A-Z a-z 0-9 . _ -"
        )
    return value


@dataclass(frozen=True)
class Keys:
    prefix: str = "pyw"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def wake(self) -> str:
        return f"{self.prefix}:wake"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def idle(self) -> str:
        return f"{self.prefix}:idle"

    @property
    def leases(self) -> str:
        return f"{self.prefix}:leases"

    @property
    def reaper(self) -> str:
        return f"{self.prefix}:reaper"

    def job(self, jid: str) -> str:
        return f"{self.prefix}:job:{jid}"

    def queue(self, jid: str) -> str:
        return f"{self.prefix}:job:{jid}:q"

    def results(self, jid: str) -> str:
        return f"{self.prefix}:job:{jid}:r"

    def results_taken(self, jid: str) -> str:
        return f"{self.prefix}:job:{jid}:rt"

    def attempts(self, jid: str) -> str:
        return f"{self.prefix}:job:{jid}:n"

    def payloads(self, jid: str) -> str:
        return f"{self.prefix}:job:{jid}:p"

    def result_payloads(self, jid: str) -> str:
        return f"{self.prefix}:job:{jid}:rp"

    def outputs(self, jid: str) -> str:
        return f"{self.prefix}:job:{jid}:o"

    def cancelled(self, jid: str) -> str:
        return f"{self.prefix}:job:{jid}:x"

    def refused(self, jid: str) -> str:
        return f"{self.prefix}:job:{jid}:k"

    def job_keys(self, jid: str) -> list[str]:
        return [self.job(jid), self.queue(jid), self.results(jid), self.results_taken(jid),
                self.attempts(jid), self.payloads(jid), self.result_payloads(jid),
                self.outputs(jid), self.cancelled(jid), self.refused(jid)]

    def fn(self, sha: str) -> str:
        return f"{self.prefix}:fn:{sha}"

    def heartbeat(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}:hb"

    def info(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}:info"

    def active(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}:active"

    def worker_wake(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}:wake"

    def stats(self, second: int) -> str:
        return f"{self.prefix}:stats:{second}"

    @property
    def counters(self) -> str:
        return f"{self.prefix}:counters"

    def lua_prelude(self) -> str:
        """The same layout as Lua functions, so the scripts in queue.py never spell a key."""
        p = self.prefix.replace("\\", "\\\\").replace("'", "\\'")
        fields = ", ".join(f"'{f}'" for f in counter_fields())
        return f"""
local P = '{p}'
local COUNTER_FIELDS = {{{fields}}}
local WAKE_TOKENS_MAX = {WAKE_TOKENS_MAX}
local K_JOBS = P .. ':jobs'
local K_WAKE = P .. ':wake'
local K_WORKERS = P .. ':workers'
local K_IDLE = P .. ':idle'
local K_LEASES = P .. ':leases'
local K_COUNTERS = P .. ':counters'
local function k_job(j) return P .. ':job:' .. j end
local function k_queue(j) return P .. ':job:' .. j .. ':q' end
local function k_results(j) return P .. ':job:' .. j .. ':r' end
local function k_attempts(j) return P .. ':job:' .. j .. ':n' end
local function k_payloads(j) return P .. ':job:' .. j .. ':p' end
local function k_rpayloads(j) return P .. ':job:' .. j .. ':rp' end
local function k_cancelled(j) return P .. ':job:' .. j .. ':x' end
local function k_refused(j) return P .. ':job:' .. j .. ':k' end
local function k_hb(w) return P .. ':worker:' .. w .. ':hb' end
local function k_info(w) return P .. ':worker:' .. w .. ':info' end
local function k_active(w) return P .. ':worker:' .. w .. ':active' end
local function k_wake(w) return P .. ':worker:' .. w .. ':wake' end
local function k_stats(s) return P .. ':stats:' .. s end
local function k_fn(s) return P .. ':fn:' .. s end
"""


def mac_context(kind: str, jid: str = "") -> bytes:
    """What a signature covers before the message itself: the protocol, the message kind and
    (results, outputs, alive records) the job."""
    return f"pyworker/1 {kind} {jid}\n".encode()


# --- headers -----------------------------------------------------------------------------------


def task_header(jid: str, chunk: int, fn_sha: str, py: str, cp: str, ref: bool = False,
                where: str | None = None, shm: str = NO_SHM, timeout: float = 0.0,
                alive: int = 0) -> bytes:
    """``where`` (INLINE, BY_REF, SHARED) overrides ``ref``; ``shm`` is the caller's tag;
    ``timeout`` is each item's time limit in seconds (0: none); ``alive`` the unix time until
    which the job is known to be alive (0: ask Redis)."""
    where = where or (BY_REF if ref else INLINE)
    return f"{jid} {chunk} {fn_sha} {py} {cp} {where} {shm} {timeout:g} {alive}\n".encode()


class TaskHeader(NamedTuple):  # a tuple: built for every task, cheaper than a dataclass
    jid: str
    chunk: int
    fn_sha: str
    python: str
    cloudpickle: str
    ref: bool
    shared: bool = False
    shm: str = NO_SHM
    timeout: float = 0.0  # each item's time limit in seconds (0: none)
    alive: int = 0  # unix time until which the job was alive when the task was made


def parse_task_header(line: bytes) -> TaskHeader:
    """Later versions may append fields: they are ignored here (so only a change to these
    fields needs both sides upgraded)."""
    fields = line.decode().rstrip("\n").split(" ")
    if len(fields) == 6:  # a caller from before shared memory
        fields.append(NO_SHM)
    if len(fields) < 7:
        raise ValueError(f"{len(fields)} fields, not 7")
    jid, chunk, fn_sha, py, cp, where, shm = fields[:7]
    if where not in (INLINE, BY_REF, SHARED):
        raise ValueError(f"bad payload flag {where!r}")
    timeout, alive = 0.0, 0
    if len(fields) > 7:
        try:
            timeout = max(float(fields[7]), 0.0)
        except ValueError:  # a field of a later version, not ours
            pass
    if len(fields) > 8 and fields[8].isdigit():
        alive = int(fields[8])
    return TaskHeader(jid, int(chunk), fn_sha, py, cp, where == BY_REF, where == SHARED, shm,
                      timeout, alive)


def lost_marker(line: bytes) -> tuple[str, int, str, int] | None:
    """(jid, chunk, dead worker, deaths) of a task the reaper gave up on (``LOST_MARK``), or
    None for any other header. Unsigned: the worker checks the task it wraps."""
    fields = line.decode(errors="replace").rstrip("\n").split(" ")
    if len(fields) != 5 or fields[2] != LOST_MARK or not fields[1].isdigit() \
            or not fields[4].isdigit():
        return None
    worker = fields[3] if _ID.match(fields[3]) else "?"
    return fields[0], int(fields[1]), worker, int(fields[4])


def alive_record(until: int, mac_hex: str) -> str:
    return f"{until} {mac_hex}"


def parse_alive_record(value) -> tuple[int, str] | None:
    try:
        until, mac = (value.decode() if isinstance(value, bytes) else value).split(" ")
        return int(until), mac
    except (AttributeError, ValueError):
        return None


def task_ids(line: bytes) -> tuple[str, int] | None:
    """(jid, chunk) of a task header that parse_task_header cannot read, if those two are
    there: enough to answer its caller."""
    fields = line.decode(errors="replace").split(" ", 2)
    if len(fields) >= 2 and fields[1].isdigit() and fields[0].isalnum():
        return fields[0], int(fields[1])
    return None


def result_header(chunk: int, status: str, worker: str, detail: str = "") -> bytes:
    """For 'ok' the detail is the payload flag; for the others, a reason for people."""
    detail = detail.replace("\n", " ")
    return f"{chunk} {status} {worker}{' ' + detail if detail else ''}\n".encode()


class ResultHeader(NamedTuple):
    chunk: int
    status: str
    worker: str
    detail: str

    @property
    def ref(self) -> bool:
        return self.status == STATUS_OK and self.detail == BY_REF

    @property
    def shared(self) -> bool:
        return self.status == STATUS_OK and self.detail == SHARED

    @property
    def payload_field(self) -> str:
        return f"{self.chunk} {self.worker}"


def output_header(chunk: int, offset: int, worker: str) -> bytes:
    return f"{chunk} {offset} {worker}\n".encode()


def parse_output_header(line: bytes) -> tuple[int, int, str]:
    chunk, offset, worker = line.decode(errors="replace").rstrip("\n").split(" ", 2)
    return int(chunk), int(offset), worker


def parse_result_header(line: bytes) -> ResultHeader:
    parts = line.decode(errors="replace").rstrip("\n").split(" ", 3)
    detail = parts[3] if len(parts) > 3 else ""
    if parts[1] == STATUS_OK:
        detail = detail.split(" ", 1)[0]  # the flag; fields a later version appends: ignored
    return ResultHeader(int(parts[0]), parts[1], parts[2], detail)


def header_line(data) -> bytes:
    """The header line of a message, newline included."""
    end = bytes(data[:512]).find(b"\n")
    if end < 0:
        raise ValueError("malformed pyworker message: no header line")
    return bytes(data[: end + 1])

"""The only module that talks to Redis. Atomic steps are Lua scripts built on protocol.Keys."""
from __future__ import annotations

import functools
import logging
import os
import time
from urllib.parse import urlsplit

from . import connection, protocol
from .config import Settings, sentinel_addresses, url_without_password
from .errors import ConnectionError as PyworkerConnectionError
from .errors import ConfigurationError, RedisError

log = logging.getLogger("pyworker.queue")

# Take the next task, round-robin over the jobs that have queued tasks, so one huge job cannot
# starve a small one started later. The task moves into the worker's active hash in the same
# step, so a worker that dies holding it cannot lose it (see REAP). Every loop turn that finds
# no task removes that job from the rotation, so the loop ends. (A job whose hash is gone has
# no queue either: end_job deletes both, and they expire together.)
# A task a submit handed to this worker comes first: a worker on the idle stack is not always
# blocked on its wake list (its wait has just ended and it is dequeuing; or, from a worker of an
# earlier version, a finish sent ahead put it there while it still ran a held task), and a
# queued task taken instead would leave the handed one waiting, in its active hash, until the
# worker next went idle. Tokens there are dropped: the worker is taking a task anyway.
# Each redis.call costs a few µs; these scripts run on every task, so they make few of them.
_DEQUEUE_FN = r"""
local function dequeue(worker, skip)
  local h = redis.call('LPOP', k_wake(worker))
  while h do
    if h ~= '1' then return h end
    h = redis.call('LPOP', k_wake(worker))
  end
  local left = -1
  if skip then left = redis.call('LLEN', K_JOBS) end
  while left ~= 0 do
    left = left - 1
    local jid = redis.call('LMOVE', K_JOBS, K_JOBS, 'LEFT', 'RIGHT')
    if not jid then return false end
    if not (skip and skip[jid]) then
      local t = redis.call('LPOP', k_queue(jid))
      if t then
        local chunk = string.match(string.sub(t, 1, 200), '^%S+ (%S+)')
        redis.call('HSET', k_active(worker), jid .. ' ' .. chunk, t)
        if redis.call('LLEN', k_queue(jid)) == 0 then redis.call('LREM', K_JOBS, 0, jid) end
        return t
      end
      redis.call('LREM', K_JOBS, 0, jid)
    end
  end
  return false
end
local function skipped(from)
  if #ARGV < from then return nil end
  local skip = {}
  for i = from, #ARGV do skip[ARGV[i]] = true end
  return skip
end
"""

# A worker that looks for a task between waits (ARGV[2] == '1') leaves the idle stack when it
# finds one, and joins it (on top: it has just run) when it finds none and is not on it yet.
# ARGV[3...]: jobs whose tasks the worker cannot verify (see _GIVE_BACK): skipped, and a worker
# with such jobs stays off the idle stack (a submit's wake-up would be lost on it).
_DEQUEUE = _DEQUEUE_FN + r"""
local skip = skipped(3)
local t = dequeue(ARGV[1], skip)
if ARGV[2] == '1' and not skip then
  if t then
    redis.call('LREM', K_IDLE, 0, ARGV[1])
  elseif not redis.call('LPOS', K_IDLE, ARGV[1]) then
    redis.call('LPUSH', K_IDLE, ARGV[1])
  end
end
return t
"""

# An executor's beat, at most once per heartbeat interval: renew its worker's lease and count
# the items it finished since the last beat (throughput for status(), and its total). A busy
# executor beats with a result, an idle one after its last. It only renews a lease (XX): one
# that ended (the worker was reaped, or Redis lost its data) comes back only with its
# supervisor's full registration (Lease.beat), which also puts it into the reaper's index
# (P:leases) -- a lease outside the index would never be reaped.
# ``counts``: what to add to P:counters (protocol.counter_deltas), for the metrics exporter: it
# rides on the beat (once a heartbeat interval), so the counters cost no command of their own.
_BEAT_FN = r"""
local function beat(worker, lease, seen, n, total, counts)
  if redis.call('SET', k_hb(worker), '1', 'PX', lease, 'XX') then
    redis.call('HSET', k_info(worker), 'seen', seen, 'done', total)
  end
  if n ~= '0' then
    local now = redis.call('TIME')[1]
    redis.call('INCRBY', k_stats(now), n)
    redis.call('EXPIRE', k_stats(now), 120)
  end
  if counts and counts ~= '' then
    local i = 0
    for v in string.gmatch(counts, '%S+') do
      i = i + 1
      if v ~= '0' and COUNTER_FIELDS[i] then redis.call('HINCRBY', K_COUNTERS, COUNTER_FIELDS[i], v) end
    end
  end
end
"""

_BEAT = _BEAT_FN + "beat(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])"

# ARGV: worker, "<jid> <chunk>", jid, result message, the beat's lease ms ('': no beat now),
#       tasks to take (0, 1, or 2: the next and one to hold), the task's payload field ('' when
#       the task was inline), result payload field ('' when the result is inline), for the
#       beat: seen, items, total, counts; '1' if the worker holds a task it will run next (sent
#       ahead), else '0'; then the jobs to skip
# The result is kept only if this worker still held the task: a worker that was declared dead
# (and whose task was re-queued) and then came back cannot add a second result.
# A second task (held while the first runs, so the worker's next finish need not be waited for)
# is taken only while the job next in turn has at least as many tasks queued as there are
# workers: near a job's end, every worker still gets one before any worker holds two.
# A worker that asked for a task and got none joins the idle stack on top (see _SUBMIT), unless
# it holds one it will run next: a submit would then hand it a task that waits behind that one,
# while a worker really idle further down the stack waits for nothing.
# Returns {1 if the result was kept else 0, the next task or '', the held task or ''}.
_FINISH = _DEQUEUE_FN + _BEAT_FN + r"""
local worker, field, jid, rfield = ARGV[1], ARGV[2], ARGV[3], ARGV[8]
local kept, ttl = 0, -2
if redis.call('HDEL', k_active(worker), field) == 1 then ttl = redis.call('PTTL', k_job(jid)) end
if ttl ~= -2 then
  kept = 1
  ttl = math.max(ttl, 1000)
  -- A list that already existed has its TTL (set here or by the reaper, kept by the caller).
  if redis.call('RPUSH', k_results(jid), ARGV[4]) == 1 then
    redis.call('PEXPIRE', k_results(jid), ttl)
  end
  if ARGV[7] ~= '' then redis.call('HDEL', k_payloads(jid), ARGV[7]) end
  if rfield ~= '' then redis.call('PEXPIRE', k_rpayloads(jid), ttl) end
elseif rfield ~= '' then
  redis.call('HDEL', k_rpayloads(jid), rfield)
end
if ARGV[5] ~= '' then beat(worker, ARGV[5], ARGV[9], ARGV[10], ARGV[11], ARGV[12]) end
local take, nxt, held = tonumber(ARGV[6]), false, false
local skip = skipped(14)
if take > 0 then
  nxt = dequeue(worker, skip)
  if not nxt and ARGV[13] ~= '1' and not skip then  -- idle from now on: the first to wake
    redis.call('LREM', K_IDLE, 0, worker)
    redis.call('LPUSH', K_IDLE, worker)
  end
end
if nxt and take > 1 then
  local head = redis.call('LINDEX', K_JOBS, 0)
  if head and redis.call('LLEN', k_queue(head)) >= redis.call('SCARD', K_WORKERS) then
    held = dequeue(worker, skip)
  end
end
return {kept, nxt or '', held or ''}
"""

# ARGV: jid, ttl ms, wake tokens (one per task, at most MAX_WAKE_TOKENS), number of job fields
#       (0: the job exists already), the shas of functions the caller did not send along
#       (space-separated), job fields, tasks...
# Returns the queue's length (tasks handed to idle workers are not queued), JOB_GONE when the job
# is gone (cancelled/expired), or FUNCTION_MISSING (nothing done) when Redis no longer has a
# function that the caller believed uploaded: it was flushed or restarted without persistence.
# The functions found get their full TTL back. A new job is created here, in the same step as
# its first tasks.
JOB_GONE, FUNCTION_MISSING = -1, -2
REAP_MAX = 512  # workers a reap looks at in one script run (see _REAP)
_SUBMIT = r"""
local jid, ttl, nfields = ARGV[1], ARGV[2], tonumber(ARGV[4])
for sha in string.gmatch(ARGV[5], '%S+') do
  if redis.call('PEXPIRE', k_fn(sha), ttl) == 0 then return -2 end
end
if nfields > 0 then
  redis.call('HSET', k_job(jid), unpack(ARGV, 6, 5 + nfields))
  redis.call('PEXPIRE', k_job(jid), ttl)
elseif redis.call('EXISTS', k_job(jid)) == 0 then
  return -1
end
-- Wake the most recently idle workers first: a worker that has just run is the quickest to run
-- again (warm caches, a core that is awake). A worker that says it takes hand-offs gets the task
-- itself, moved into its active hash here as a dequeue would (so nothing is lost if it dies),
-- and starts without a dequeue of its own; any other worker gets a token and dequeues.
local wake, woken, i = tonumber(ARGV[3]), 0, 6 + nfields
while woken < wake do
  local w = redis.call('LPOP', K_IDLE)
  if not w then break end
  if redis.call('EXISTS', k_hb(w)) == 1 then
    if i <= #ARGV and redis.call('HGET', k_info(w), 'handoff') == '1' then
      local t = ARGV[i]
      local chunk = string.match(string.sub(t, 1, 200), '^%S+ (%S+)')
      redis.call('HSET', k_active(w), jid .. ' ' .. chunk, t)
      redis.call('RPUSH', k_wake(w), t)
      i = i + 1
    else
      redis.call('RPUSH', k_wake(w), '1')
    end
    woken = woken + 1
  end
end
local len = 0
for j = i, #ARGV, 500 do
  len = redis.call('RPUSH', k_queue(jid), unpack(ARGV, j, math.min(j + 499, #ARGV)))
end
if len > 0 then
  redis.call('PEXPIRE', k_queue(jid), ttl)
  if nfields > 0 or not redis.call('LPOS', K_JOBS, jid) then redis.call('RPUSH', K_JOBS, jid) end
end
-- Tokens left over go to every waiting worker's common list (workers from before the idle
-- stack, too), but never more than there are workers besides those woken: a busy worker takes
-- its next task with its finish, and every surplus token costs some idle worker a useless round
-- trip later (a long job would otherwise leave one per chunk behind it).
local room = 0
if wake > woken then room = math.min(redis.call('SCARD', K_WORKERS), WAKE_TOKENS_MAX) - woken end
wake = math.min(wake - woken, room)
if wake > 0 then
  local tokens = {}
  for k = 1, wake do tokens[k] = '1' end
  if redis.call('RPUSH', K_WAKE, unpack(tokens)) > room then
    redis.call('LTRIM', K_WAKE, -room, -1)
  end
end
return len
"""

# A supervisor's beat while its executor runs a task (supervisor.Lease; between tasks a plain
# SET XX does): renew the worker's lease (only renew it, as _BEAT_FN), and find which of the
# tasks ARGV[3...] ("<jid> <chunk>") are to stop: their job no longer exists (cancelled, timed
# out or abandoned) or their call was cancelled (Future.cancel).
# Returns {1 if the lease had ended (the supervisor registers again) else 0, tasks to stop...}.
_KEEP = r"""
local out = {0}
if not redis.call('SET', k_hb(ARGV[1]), '1', 'PX', ARGV[2], 'XX') then out[1] = 1 end
for i = 3, #ARGV do
  local jid, chunk = string.match(ARGV[i], '^(%S+) (%S+)$')
  if jid and (redis.call('EXISTS', k_job(jid)) == 0
              or redis.call('SISMEMBER', k_cancelled(jid), chunk) == 1) then
    out[#out + 1] = ARGV[i]
  end
end
return out
"""

# The shared-memory identity ('' for none) of every worker with a live lease, in one step.
_LIVE = r"""
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', K_WORKERS)) do
  if redis.call('EXISTS', k_hb(name)) == 1 then
    out[#out + 1] = redis.call('HGET', k_info(name), 'shm') or ''
  end
end
return out
"""

# Re-queue the tasks of workers whose lease expired. A task whose workers died more than
# ARGV[1] times is queued wrapped as lost instead (a worker answers 'lost' for it). ARGV[2], if given, names a worker to treat
# as dead anyway: with ARGV[3] == '1' it is stopping and gives back the tasks it had not
# started: they are re-queued and not counted.
# Which workers: not every registered one (each EXISTS costs a call, and every worker reaping
# every worker is O(W^2)), but those due in the index P:leases, whose score is the earliest
# Redis time (ms) their lease can have ended. A due worker whose lease still runs gets the time
# its lease now ends as its score (its beats do not touch the index: they stay one command);
# one whose lease is gone is reaped. So each live worker costs a PTTL and a ZADD about once a
# lease, and a dead one is found at the first reap after its lease ended. At most ARGV[4]
# workers are looked at per run (the rest at the next: a script blocks Redis while it runs).
# Returns {workers still registered, reaped worker ids...}.
_REAP = r"""
local max_retries = tonumber(ARGV[1])
local release = ARGV[3] == '1'
local names = {}
local forced = ARGV[2] and ARGV[2] ~= ''
if forced then
  names = {ARGV[2]}
else
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local due = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
  for _, name in ipairs(due) do
    local left = redis.call('PTTL', k_hb(name))
    if left == -2 then
      names[#names + 1] = name
    else  -- alive (-1, a lease without a TTL, is not pyworker's: looked at again in 60 s)
      if left < 0 then left = 60000 end
      redis.call('ZADD', K_LEASES, now + left, name)
    end
  end
end
local reaped = {0}
for _, name in ipairs(names) do
  local act = redis.call('HGETALL', k_active(name))
  for i = 1, #act, 2 do
    local jid, chunk = string.match(act[i], '^(%S+) (%S+)$')
    if jid and redis.call('EXISTS', k_job(jid)) == 1 then
      local ttl = math.max(redis.call('PTTL', k_job(jid)), 1000)
      local n = 0
      if not release then
        n = redis.call('HINCRBY', k_attempts(jid), chunk, 1)
        redis.call('PEXPIRE', k_attempts(jid), ttl)
      end
      local t = act[i + 1]
      if n > max_retries then
        -- Failed for good: Redis has no key to sign the 'lost' answer, so the task goes back
        -- wrapped (protocol LOST_MARK) for a worker to check and answer.
        t = jid .. ' ' .. chunk .. ' !lost ' .. name .. ' ' .. n .. '\n'
            .. (string.match(t, '^%S+ %S+ !lost [^\n]*\n(.*)$') or t)
      end
      redis.call('LPUSH', k_queue(jid), t)
      redis.call('PEXPIRE', k_queue(jid), ttl)
      if not redis.call('LPOS', K_JOBS, jid) then redis.call('LPUSH', K_JOBS, jid) end
      redis.call('RPUSH', K_WAKE, '1')
    end
  end
  -- tokens it was woken with and did not take wake another worker instead
  local owed = redis.call('LLEN', k_wake(name))
  for _ = 1, owed do redis.call('RPUSH', K_WAKE, '1') end
  redis.call('DEL', k_active(name), k_info(name), k_wake(name))
  redis.call('SREM', K_WORKERS, name)
  redis.call('ZREM', K_LEASES, name)
  redis.call('LREM', K_IDLE, 0, name)
  table.insert(reaped, name)
end
reaped[1] = redis.call('ZCARD', K_LEASES)
return reaped
"""

# A worker that cannot verify a task (its signing key is not the caller's) gives it back: out of
# its active hash, to the head of its queue, uncounted; the worker joins the job's refused set and
# leaves the idle stack, and the most recently idle worker is woken to take the task instead.
# ARGV: worker, jid, chunk, ttl ms. Returns 1 if the task was given back, 0 if the worker no
# longer held it or the job is gone.
_GIVE_BACK = r"""
local worker, jid, field = ARGV[1], ARGV[2], ARGV[2] .. ' ' .. ARGV[3]
local t = redis.call('HGET', k_active(worker), field)
redis.call('HDEL', k_active(worker), field)
redis.call('LREM', K_IDLE, 0, worker)
redis.call('HSET', k_info(worker), 'handoff', '0')
redis.call('HINCRBY', k_info(worker), 'refused', 1)
if not t or redis.call('EXISTS', k_job(jid)) == 0 then return 0 end
redis.call('SADD', k_refused(jid), worker)
redis.call('PEXPIRE', k_refused(jid), ARGV[4])
redis.call('LPUSH', k_queue(jid), t)
redis.call('PEXPIRE', k_queue(jid), ARGV[4])
if not redis.call('LPOS', K_JOBS, jid) then redis.call('LPUSH', K_JOBS, jid) end
local w = redis.call('LPOP', K_IDLE)
if w then redis.call('RPUSH', k_wake(w), '1') else redis.call('RPUSH', K_WAKE, '1') end
return 1
"""

# For a caller whose job gets no results: {workers with a live lease, how many of them could not
# verify the job's tasks}.
_REFUSED = r"""
local live, refused = 0, 0
for _, name in ipairs(redis.call('SMEMBERS', K_WORKERS)) do
  if redis.call('EXISTS', k_hb(name)) == 1 then
    live = live + 1
    if redis.call('SISMEMBER', k_refused(ARGV[1]), name) == 1 then refused = refused + 1 end
  end
end
return {live, refused}
"""

# Whether a live worker holds the task "<jid> <chunk>" (ARGV[1]) in its active hash: it runs it
# (a worker takes a task ahead only while its tasks are short). O(workers): for Future.running(),
# which people call now and then, not for anything on the hot path.
_HELD = r"""
for _, name in ipairs(redis.call('SMEMBERS', K_WORKERS)) do
  if redis.call('HEXISTS', k_active(name), ARGV[1]) == 1 and redis.call('EXISTS', k_hb(name)) == 1
  then return 1 end
end
return 0
"""


# The metrics exporter's sample (metrics.py), in one step: {live workers, busy workers (holding
# a task), tasks they hold (running, or taken ahead), tasks queued, P:counters as a flat list}.
# O(workers + jobs with queued tasks): a scrape every few seconds, not the hot path.
_METRICS = r"""
local live, busy, running = 0, 0, 0
for _, name in ipairs(redis.call('SMEMBERS', K_WORKERS)) do
  if redis.call('EXISTS', k_hb(name)) == 1 then
    live = live + 1
    local n = redis.call('HLEN', k_active(name))
    if n > 0 then
      busy = busy + 1
      running = running + n
    end
  end
end
local queued = 0
for _, jid in ipairs(redis.call('LRANGE', K_JOBS, 0, -1)) do
  queued = queued + redis.call('LLEN', k_queue(jid))
end
return {live, busy, running, queued, redis.call('HGETALL', K_COUNTERS)}
"""


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def describe_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname}:{parts.port or 6379}"
    except ValueError:
        return url


# Error replies that waiting fixes: they are waited out like an outage (PYWORKER_RECONNECT_S).
_WAIT_FOR = {
    "LOADING": "is loading its data set from disk",
    "BUSY": "is busy running a script (busy-reply-threshold)",
    "READONLY": "is a read-only replica (a failover under way? PYWORKER_REDIS_URL must name "
                "the primary)",
    "TRYAGAIN": "asks to try again",
    "MASTERDOWN": "is a replica that lost its primary",
}
# Error replies that need a change to Redis' settings, and which.
_HINTS = {
    "OOM": "Redis reached its memory limit: raise maxmemory (pyworker needs "
           "maxmemory-policy noeviction: evicted keys would lose tasks and results)",
    "MISCONF": "Redis cannot save its RDB snapshot, so it refuses writes: make its dir writable "
               "(and its disk not full), or set stop-writes-on-bgsave-error no",
    "NOPERM": "the Redis user lacks a permission pyworker needs: grant it with ACL SETUSER (its "
              "commands, EVAL/EVALSHA, and the keys under PYWORKER_PREFIX)",
    "WRONGTYPE": "a key under PYWORKER_PREFIX holds another program's data: give pyworker a "
                 "prefix (PYWORKER_PREFIX) or a database of its own",
    "NOSCRIPT": "Redis does not keep Lua scripts: pyworker needs EVAL and SCRIPT LOAD",
}


def _reply_error(where: str, exc: connection.ReplyError) -> Exception:
    """The pyworker error for an error reply: a retryable ConnectionError for a passing state,
    a ConnectionError for a refused password, else a RedisError naming what to change."""
    text = str(exc)
    code = text.split(" ", 1)[0]
    line = _one_line(exc)
    if code in _WAIT_FOR:
        return PyworkerConnectionError(f"Redis at {where} {_WAIT_FOR[code]} ({line})")
    if code in ("WRONGPASS", "NOAUTH") or "AUTH" in text.split(" ", 2)[:2] \
            or "without any password configured" in text:
        hint = ("set PYWORKER_REDIS_PASSWORD or pass password= to pyworker.connect()"
                if code == "NOAUTH" else
                "check PYWORKER_REDIS_PASSWORD or the password given to pyworker.connect()")
        return PyworkerConnectionError(f"Redis at {where} refused the password ({line}): {hint}",
                                       retryable=False)
    if code in _HINTS:
        hint = _HINTS[code]
    elif "max number of clients" in text:
        hint = "raise Redis' maxclients"
    elif "unknown command" in text:
        hint = "pyworker needs Redis 6.2 or later"
    else:
        hint = "see Redis' log"
    return RedisError(f"Redis at {where} refused a command ({line}): {hint}")


def eviction_warning(where: str, policy: str) -> str | None:
    """What to tell the user about a Redis whose maxmemory-policy is ``policy``; None when it
    never evicts. volatile-* policies evict only keys with a TTL, but that is no comfort: every
    key of a job (its hash, queue, results, payloads), every function and every worker's lease
    has one, so they evict exactly pyworker's keys."""
    if policy in ("", "noeviction"):
        return None
    if policy.startswith("volatile-"):
        how = ("evicts keys that have a TTL, and pyworker's keys (jobs, their queues and "
               "results, functions, workers' leases) all have one")
    else:
        how = "evicts any key"
    return (f"Redis at {where} has maxmemory-policy {policy}: when full, it {how}. An evicted "
            "lease, queue or result strands jobs (a pmap without a timeout can wait for ever). "
            "Set maxmemory-policy noeviction on that Redis: when full, it then refuses new work "
            "with an OOM error instead")


_warned_eviction: set[str] = set()  # Redis URLs (without password) warned about, in this process


def translate_errors(method):
    """Redis errors become one clear line, not a stack of socket errors or a raw reply."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except connection.ReplyError as exc:
            raise _reply_error(self.where, exc) from None
        except PyworkerConnectionError:  # an OSError too: already said, keep its `retryable`
            raise
        except OSError as exc:
            raise PyworkerConnectionError(
                f"cannot reach Redis at {self.where}: {_one_line(exc) or 'connection failed'}. "
                "Check PYWORKER_REDIS_URL and that Redis is running"
            ) from None

    return wrapper


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _connect(settings: Settings, timeout_s: float | None = None) -> connection.Redis:
    tls = {}
    for name, option in (("redis_ca_file", "ssl_ca_certs"), ("redis_cert_file", "ssl_certfile"),
                         ("redis_key_file", "ssl_keyfile")):
        path = getattr(settings, name)
        if path:
            if not os.path.isfile(path):
                raise ConfigurationError(f"PYWORKER_{name.upper()}={path!r}: no such file")
            tls[option] = path
    if bool(settings.redis_cert_file) != bool(settings.redis_key_file):
        raise ConfigurationError("PYWORKER_REDIS_CERT_FILE and PYWORKER_REDIS_KEY_FILE go "
                                 "together (the client certificate and its key)")
    sentinels = ()
    if settings.redis_sentinels:
        sentinels = sentinel_addresses(settings.redis_sentinels)
    return connection.Redis(settings.redis_url, password=settings.redis_password or None,
                      username=settings.redis_username or None,
                      connect_timeout=settings.connect_timeout_s, tls=tls or None,
                      **({"timeout": timeout_s} if timeout_s else {}),
                      sentinels=sentinels, sentinel_master=settings.redis_sentinel_master,
                      sentinel_password=settings.redis_sentinel_password or None)


class Broker:
    """A Redis connection pool plus the operations pyworker needs, named for what they do."""

    def __init__(self, settings: Settings, need_secret: bool = True,
                 timeout_s: float | None = None):
        """``timeout_s``: how long any reply may take (the handshake's too; default 30 s), for
        a reader that must answer in bounded time (the metrics exporter)."""
        settings.require_connection(secret=need_secret)
        self.settings = settings
        self.keys = protocol.Keys(settings.prefix)
        self.where = (f"{settings.redis_sentinel_master} (Sentinel {settings.redis_sentinels})"
                      if settings.redis_sentinels else describe_url(settings.redis_url))
        try:
            self.redis = _connect(settings, timeout_s)
        except ValueError as exc:
            shown = url_without_password(settings.redis_url)
            raise PyworkerConnectionError(
                f"PYWORKER_REDIS_URL={shown!r} is not a Redis URL ({exc}); "
                "expected redis://host:6379/0 (or unix:///path/to/redis.sock)",
                retryable=False) from None
        prelude = self.keys.lua_prelude()
        self._dequeue = connection.Script(prelude + _DEQUEUE)
        self._finish = connection.Script(prelude + _FINISH)
        self._submit = connection.Script(prelude + _SUBMIT)
        self._beat = connection.Script(prelude + _BEAT)
        self._keep = connection.Script(prelude + _KEEP)
        self._reap = connection.Script(prelude + _REAP)
        self._live = connection.Script(prelude + _LIVE)
        self._held = connection.Script(prelude + _HELD)
        self._give_back = connection.Script(prelude + _GIVE_BACK)
        self._refused = connection.Script(prelude + _REFUSED)
        self._metrics = connection.Script(prelude + _METRICS)
        # Jobs whose tasks this (worker's) broker cannot verify: dequeues skip them.
        self.skip_jobs: list[str] = []
        self._submit_loaded = False  # whether Redis is known to have the submit script
        self._ttl_ms = int(settings.job_ttl_s * 1000)
        self._lease_ms = int(settings.lease_s * 1000)
        # Clean-ups of finished jobs ride along with the next pipeline instead of costing a
        # round trip each; if none comes, the keys expire by themselves.
        self._deferred: list[tuple] = []
        self._policy_checked = False
        self._policy: str | None = None

    def close(self):
        self.redis.close()

    def _then_script(self, commands: list, script: connection.Script, *args, retry: bool = True):
        """Send commands and a script call in one round trip; the script's reply. retry=False
        for a script that moves tasks (connection.Redis._with_connection)."""
        replies = self.redis.pipeline(commands + [("EVALSHA", script.sha, 0, *args)],
                                      raise_errors=False, retry=retry)
        return self._script_reply(replies, script, args, retry)

    def _script_reply(self, replies: list, script: connection.Script, args, retry: bool = True):
        """The last reply, a script's (run again by its source if Redis did not have it); an
        error reply of any command raises."""
        last = replies[-1]
        if isinstance(last, connection.ReplyError) and str(last).startswith("NOSCRIPT"):
            last = self.redis.run(script, *args, retry=retry)
        for reply in replies[:-1] + [last]:
            if isinstance(reply, connection.ReplyError):
                raise reply
        return last

    # --- both sides ----------------------------------------------------------------------------

    @translate_errors
    def ping(self) -> None:
        self.redis.call("PING")

    def eviction_policy(self) -> str | None:
        """Redis' maxmemory-policy, from INFO memory or else CONFIG GET; None when Redis tells
        neither (managed Redis often refuses CONFIG, proxies INFO). Raises OSError (or a
        pyworker ConnectionError) when Redis cannot be reached."""
        for command in (("INFO", "memory"), ("CONFIG", "GET", "maxmemory-policy")):
            try:
                reply = self.redis.call(*command)
            except connection.ReplyError as exc:
                log.debug("Redis at %s refused %s (%s): its maxmemory-policy is not known",
                          self.where, command[0], _one_line(exc))
                continue
            if command[0] == "INFO":
                for line in _s(reply).splitlines():
                    if line.startswith("maxmemory_policy:"):
                        return line.split(":", 1)[1].strip()
            elif reply and len(reply) >= 2:
                return _s(reply[1])
        return None

    def check_eviction_policy(self) -> str | None:
        """Warn, once per process and Redis, when Redis can evict pyworker's keys; returns the
        policy (None: Redis would not tell). Asks Redis once per Broker."""
        if self._policy_checked:
            return self._policy
        try:
            policy = self.eviction_policy()
        except (OSError, PyworkerConnectionError):
            return None  # asked again next time; the caller's own command reports the outage
        self._policy_checked, self._policy = True, policy
        url = url_without_password(self.settings.redis_url)
        message = eviction_warning(self.where, policy or "")
        if message and url not in _warned_eviction:
            _warned_eviction.add(url)
            log.warning("pyworker: %s", message)
        return policy

    @translate_errors
    def reap(self, force_name: str = "", release: bool = False) -> list[str]:
        """Reap the workers whose lease ended (see _REAP); the ids reaped."""
        return self._reap_due(force_name, release)[1]

    def _reap_due(self, force_name: str = "", release: bool = False) -> tuple[int, list[str]]:
        reply = self.redis.run(self._reap, self.settings.max_retries, force_name,
                               1 if release else 0, REAP_MAX)
        return int(reply[0]), [_s(n) for n in reply[1:]]

    @translate_errors
    def try_reap(self, worker: str) -> tuple[int, list[str]] | None:
        """Reap, if no other worker has within lease/2 (P:reaper): one reaper at a time, so
        that W workers trying cost W plain commands and one reap. None: another worker reaped;
        else (workers registered, ids reaped)."""
        if self.redis.call("SET", self.keys.reaper, worker, "NX", "PX",
                           max(self._lease_ms // 2, 1)) is None:
            return None
        return self._reap_due()

    # --- caller side ---------------------------------------------------------------------------

    @translate_errors
    def live_workers(self) -> int:
        return len(self.live_worker_shm())

    @translate_errors
    def live_worker_shm(self) -> list[str]:
        """The shared-memory identity ('' for none) of every worker with a live lease."""
        return [_s(i) for i in self.redis.run(self._live) or []]

    @translate_errors
    def submit(self, jid: str, tasks: list[bytes], wake: int, meta: dict | None = None,
               fn_blobs: dict[str, bytes] | None = None,
               payloads: dict[int, bytes] | None = None, check=(), pop_s: float | None = None,
               spin_s: float = 0.0):
        """Queue tasks (and the payloads too big to travel inline); with meta, create the job;
        fn_blobs uploads functions in the same round trip, ``check`` names functions uploaded
        before, which get their full TTL again. Returns the queue's length, JOB_GONE, or
        FUNCTION_MISSING (nothing was queued: a function in ``check`` is no longer in Redis);
        with pop_s, (that, the first result message or None): the same round trip then waits up
        to pop_s for a result, which saves a round trip for short jobs, busy-polling for the
        replies the first spin_s of it (connection.Redis._spin)."""
        commands = self._take_deferred()
        fields = [x for kv in meta.items() for x in kv] if meta else []
        for sha, blob in (fn_blobs or {}).items():
            commands.append(("SET", self.keys.fn(sha), blob, "PX", self._ttl_ms))
        if payloads:
            commands.append(("HSET", self.keys.payloads(jid),
                             *(x for kv in payloads.items() for x in kv)))
            commands.append(("PEXPIRE", self.keys.payloads(jid), self._ttl_ms))
        args = (jid, self._ttl_ms, wake, len(fields), " ".join(check), *fields, *tasks)
        if pop_s is None:
            return self._then_script(commands, self._submit, *args)
        # The BLPOP must never wait behind a submit that did not happen (NOSCRIPT: a new or
        # restarted Redis), so the script is loaded in the same round trip until it is known.
        load = [] if self._submit_loaded else [("SCRIPT", "LOAD", self._submit.source)]
        commands += load + [("EVALSHA", self._submit.sha, 0, *args)]
        # The replies up to the submit's come at once, the take's with its PEXPIRE's: a spin
        # before the first and before the take's (see connection.Redis.pipeline).
        replies = self.redis.pipeline(
            commands + self._take_result(jid, pop_s), raise_errors=False, spin_s=spin_s,
            retry=False, timeout=pop_s + max(5.0, pop_s), spin_at=(0, len(commands)))
        queued, popped = replies[-3], replies[-2]
        self._submit_loaded = True
        if isinstance(queued, connection.ReplyError) and str(queued).startswith("NOSCRIPT"):
            self._submit_loaded = False
            queued, popped = self.redis.run(self._submit, *args), None
        for reply in replies[:-3] + [queued, popped, replies[-1]]:
            if isinstance(reply, connection.ReplyError):
                raise reply
        return queued, popped

    def _take_result(self, jid: str, wait_s: float, more: int = 0) -> list[tuple]:
        """Move the job's next result to its taken list, waiting up to wait_s, and up to
        ``more`` results that are there by then (no wait): the results stay in Redis until the
        caller acknowledges them (pop_results' ack), so an answer lost with its connection
        loses no result (taken_results finds them). Commands after a blocking one run once it
        returns, so the extra moves see what arrived during the wait."""
        taken, results = self.keys.results_taken(jid), self.keys.results(jid)
        return ([("BLMOVE", results, taken, "LEFT", "RIGHT", f"{wait_s:.3f}")]
                + [("LMOVE", results, taken, "LEFT", "RIGHT")] * more
                + [("PEXPIRE", taken, self._ttl_ms)])

    @translate_errors
    def take_result_payload(self, jid: str, field: str):
        """A result's payload; it leaves Redis with the next round trip (not this one: an
        answer lost with its connection would take the payload with it)."""
        got = self.redis.call("HGET", self.keys.result_payloads(jid), field)
        if got is not None:
            self._deferred.append(("HDEL", self.keys.result_payloads(jid), field))
        return got

    @translate_errors
    def pop_results(self, jid: str, timeout_s: float, ack: int = 0, more: int = 0) -> list:
        """The job's next result messages, oldest first: the first waited for (up to
        timeout_s; none came: []), then up to ``more`` that are in by then, in the same round
        trip. First, the ``ack`` oldest results taken before are acknowledged (the caller has
        them: they leave Redis)."""
        wait = max(timeout_s, 0.01)
        take = self._take_result(jid, wait, more)
        after = self._take_deferred()
        # After the blocking move, not before it: a reply ahead of it would wake the caller
        # once for nothing. The taken list gets its new results on the right, so the ``ack``
        # on its left are still the old ones.
        if ack:
            after.append(("LPOP", self.keys.results_taken(jid), ack))
        try:
            replies = self.redis.pipeline(take[:-1] + after + take[-1:],
                                          retry=False, timeout=wait + max(5.0, wait))
        except BaseException:
            self._deferred[:0] = after[:-1] if ack else after  # not sent, or lost: again
            raise
        return [r for r in replies[:len(take) - 1] if r is not None]

    @translate_errors
    def taken_results(self, jid: str) -> list[bytes]:
        """The results taken and not acknowledged, oldest first."""
        return self.redis.call("LRANGE", self.keys.results_taken(jid), 0, -1) or []

    @translate_errors
    def job_exists(self, jid: str) -> bool:
        return self.redis.call("EXISTS", self.keys.job(jid)) == 1

    @translate_errors
    def keep_alive(self, jids, fn_shas, alive: dict[str, str] | None = None) -> None:
        """Refresh the TTLs of jobs and functions; ``alive``: jid -> its new signed 'alive'
        record (protocol.alive_record), which lets workers run its older tasks."""
        # (the HSETs first: one that recreated a job ended meanwhile still gets a TTL)
        commands = [("HSET", self.keys.job(jid), "alive", record)
                    for jid, record in (alive or {}).items()]
        commands += [("PEXPIRE", key, self._ttl_ms) for jid in jids
                     for key in self.keys.job_keys(jid)]
        commands += [("PEXPIRE", self.keys.fn(sha), self._ttl_ms) for sha in fn_shas]
        commands += self._take_deferred()
        if commands:
            self.redis.pipeline(commands)

    @translate_errors
    def end_job(self, jid: str, now: bool = True) -> None:
        """Delete the job: queued tasks leave Redis, running ones are neither kept nor retried.
        A finished job (not now) is no longer in the rotation: the dequeue that took its last
        task took it out (and one that finds its queue gone does)."""
        if now:
            self.redis.pipeline(self._take_deferred() + [("DEL", *self.keys.job_keys(jid)),
                                                         ("LREM", self.keys.jobs, 0, jid)])
        else:
            self._deferred.append(("DEL", *self.keys.job_keys(jid)))

    def _take_deferred(self) -> list[tuple]:
        taken, self._deferred = self._deferred, []
        return taken

    @translate_errors
    def drop_queued(self, jid: str) -> None:
        self.redis.call("DEL", self.keys.queue(jid))

    # --- worker side ---------------------------------------------------------------------------

    @translate_errors
    def register_worker(self, name: str, info: dict) -> int:
        """Register a worker (its id) with its lease, and put it into the reaper's index (due
        at once: the next reap gives it the time its lease ends). Returns how many workers are
        registered."""
        fields = [x for kv in info.items() for x in kv]
        return self.redis.pipeline([
            ("SET", self.keys.heartbeat(name), "1", "PX", self._lease_ms),
            ("HSET", self.keys.info(name), *fields),
            ("SADD", self.keys.workers, name),
            ("ZADD", self.keys.leases, 0, name),
            ("ZCARD", self.keys.leases),
        ])[-1]

    @translate_errors
    def heartbeat(self, name: str, n: int = 0, total: int = 0, counts: str = "") -> None:
        """The executor's beat (see _BEAT_FN): renew the lease, and n more items done
        (``counts``: what to add to the metrics' counters, protocol.counter_deltas)."""
        self.redis.run(self._beat, name, self._lease_ms, f"{time.time():.3f}", n, total, counts)

    @translate_errors
    def renew_lease(self, name: str) -> bool:
        """A supervisor's beat between tasks, one command: renew the worker's lease if it still
        has one; False if it had ended (reaped, or Redis lost it: register again)."""
        return self.redis.call("SET", self.keys.heartbeat(name), "1", "PX", self._lease_ms,
                               "XX") is not None

    @translate_errors
    def keep(self, name: str, fields=()) -> tuple[list[str], bool]:
        """A supervisor's beat while a task runs (see _KEEP): (of the tasks ``fields``
        ("<jid> <chunk>"), those to stop (their job is gone, or their call was cancelled);
        whether the lease had ended: register again)."""
        reply = self.redis.run(self._keep, name, self._lease_ms, *fields)
        return [_s(f) for f in reply[1:]], reply[0] == 1

    @translate_errors
    def push_output(self, jid: str, messages: list[bytes]) -> None:
        """What a running task printed (output messages, protocol.py), for its caller."""
        self.redis.pipeline([("RPUSH", self.keys.outputs(jid), *messages),
                             ("PEXPIRE", self.keys.outputs(jid), self._ttl_ms)])

    @translate_errors
    def pop_outputs(self, jid: str, n: int = 1000) -> list[bytes]:
        return self.redis.call("LPOP", self.keys.outputs(jid), n) or []

    @translate_errors
    def cancel_chunks(self, jid: str, chunks) -> None:
        """Calls the caller no longer wants (Future.cancel): a worker running one stops it."""
        self.redis.pipeline([("SADD", self.keys.cancelled(jid), *chunks),
                             ("PEXPIRE", self.keys.cancelled(jid), self._ttl_ms)])

    @translate_errors
    def give_back(self, name: str, jid: str, chunk: int) -> bool:
        """A task this worker cannot verify goes back to its queue for another (_GIVE_BACK)."""
        return self.redis.run(self._give_back, name, jid, chunk, self._ttl_ms, retry=False) == 1

    @translate_errors
    def refusals(self, jid: str) -> tuple[int, int]:
        """(live workers, how many of them could not verify this job's tasks)."""
        live, refused = self.redis.run(self._refused, jid)
        return int(live), int(refused)

    @translate_errors
    def job_alive_record(self, jid: str):
        """The job's signed 'alive' record (protocol.alive_record), or None."""
        return self.redis.call("HGET", self.keys.job(jid), "alive")

    @translate_errors
    def chunk_held(self, jid: str, chunk: int) -> bool:
        """Whether a live worker has taken this chunk (it runs it now)."""
        return self.redis.run(self._held, f"{jid} {chunk}") == 1

    @translate_errors
    def set_worker_info(self, name: str, **info) -> None:
        self.redis.call("HSET", self.keys.info(name), *[x for kv in info.items() for x in kv])

    @translate_errors
    def forget_tasks(self, name: str, jid: str, field: str | None = None) -> int:
        """Take a job's tasks (or the one ``field``) out of a worker's active hash: nobody
        wants them run (the job is gone, or the call cancelled), and nothing may re-queue them;
        how many there were."""
        fields = [f for f in self.held_tasks(name)
                  if f == field or field is None and f.split(" ", 1)[0] == jid]
        if fields:
            self.redis.call("HDEL", self.keys.active(name), *fields)
        return len(fields)

    @translate_errors
    def deregister_worker(self, name: str) -> None:
        # Anything still held (a task taken ahead and not started) goes back to the queue first.
        self.reap(force_name=name, release=True)
        self.redis.pipeline([("DEL", self.keys.heartbeat(name), self.keys.info(name)),
                             ("SREM", self.keys.workers, name),
                             ("ZREM", self.keys.leases, name)])

    @translate_errors
    def dequeue(self, name: str):
        """Take a task; none: the worker is idle (see _DEQUEUE)."""
        return self.redis.run(self._dequeue, name, 1, *self.skip_jobs, retry=False)

    @translate_errors
    def wait_and_dequeue(self, name: str, timeout_s: float, stopping=None):
        """Block until woken or timeout_s. Woken with a task (a submit handed it over: it is in
        this worker's active hash already), that task, in one round trip and no script; woken
        with a token (its own from a caller from before hand-offs, or a common one), or after
        the wait, the worker takes a task itself (dequeue) -- unless ``stopping`` (an Event)
        is set by then: its supervisor woke it to stop."""
        got = self.redis.call("BLPOP", self.keys.worker_wake(name), self.keys.wake,
                              f"{timeout_s:.3f}", timeout=timeout_s + 5.0, retry=False)
        if got is not None and got[1] != b"1":
            return got[1]
        if stopping is not None and stopping.is_set():
            return None
        return self.dequeue(name)

    @translate_errors
    def wake_worker(self, name: str) -> None:
        """Wake a worker's executor from its idle wait (a token in its own wake list)."""
        self.redis.call("RPUSH", self.keys.worker_wake(name), "1")

    @translate_errors
    def unhand(self, name: str, tasks: list[bytes]) -> None:
        """Take tasks out of a worker's wake list (where a submit hands tasks over)."""
        if tasks:
            self.redis.pipeline([("LREM", self.keys.worker_wake(name), 0, t) for t in tasks])

    @translate_errors
    def held_tasks(self, name: str) -> dict[str, bytes]:
        """The tasks a worker holds in Redis: "<jid> <chunk>" -> task message."""
        flat = self.redis.call("HGETALL", self.keys.active(name)) or []
        return {_s(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}

    @translate_errors
    def task_payload(self, jid: str, chunk: int):
        return self.redis.call("HGET", self.keys.payloads(jid), chunk)

    def _finish_call(self, name, jid, chunk, result, take, result_payload, had_payload, beat,
                     holding=False):
        commands, rfield = [], ""
        if result_payload is not None:
            rfield = f"{chunk} {name}"
            commands.append(("HSET", self.keys.result_payloads(jid), rfield, result_payload))
        lease, seen, n, total, counts = "", "", 0, 0, ""
        if beat is not None:
            lease, seen, (n, total, counts) = self._lease_ms, f"{time.time():.3f}", beat
        return commands, (name, f"{jid} {chunk}", jid, result, lease, take,
                          chunk if had_payload else "", rfield, seen, n, total, counts,
                          "1" if holding else "0", *self.skip_jobs)

    @staticmethod
    def _finished(reply) -> tuple[bool, list[bytes]]:
        kept, *tasks = reply
        return bool(kept), [t for t in tasks if t]

    @translate_errors
    def finish(self, name: str, jid: str, chunk: int, result: bytes, take: int,
               result_payload: bytes | None = None, had_payload: bool = False,
               beat: tuple[int, int, str] | None = None,
               holding: bool = False) -> tuple[bool, list[bytes]]:
        """Report a task's result and take up to ``take`` tasks (0-2, see _FINISH) in the same
        step: (whether the result was kept, the tasks taken). A result is not kept when the
        worker no longer held the task or the job ended. With beat=(items, total, counts), the worker's
        beat goes in the same step (see heartbeat). ``holding``: the worker has a task to run
        next (it does not join the idle stack)."""
        commands, args = self._finish_call(name, jid, chunk, result, take, result_payload,
                                           had_payload, beat, holding)
        return self._finished(self._then_script(commands, self._finish, *args, retry=False))

    @translate_errors
    def finish_later(self, name: str, jid: str, chunk: int, result: bytes, take: int,
                     result_payload: bytes | None = None, had_payload: bool = False,
                     beat: tuple[int, int, str] | None = None):
        """finish() of a worker holding a task, sent now and answered later: returns a function
        that waits for the answer (the worker runs its held task meanwhile instead of waiting
        for Redis)."""
        commands, args = self._finish_call(name, jid, chunk, result, take, result_payload,
                                           had_payload, beat, holding=True)
        pending = self.redis.send(commands + [("EVALSHA", self._finish.sha, 0, *args)])
        return functools.partial(self._finish_answer, pending, args)

    @translate_errors
    def _finish_answer(self, pending, args) -> tuple[bool, list[bytes]]:
        return self._finished(self._script_reply(pending.replies(), self._finish, args,
                                                 retry=False))

    @translate_errors
    def drop_task(self, name: str, jid: str, chunk: int, result: bytes,
                  had_payload: bool = False) -> None:
        """Give up a task this worker cannot run, telling its caller why (result has no pickle)."""
        self.finish(name, jid, chunk, result, 0, had_payload=had_payload)

    @translate_errors
    def get_function(self, sha: str):
        return self.redis.call("GET", self.keys.fn(sha))

    # --- status --------------------------------------------------------------------------------

    @translate_errors
    def metrics(self, timeout_s: float = 5.0) -> dict:
        """The numbers the metrics exporter serves (see _METRICS), in one round trip of at
        most timeout_s: workers, busy, running, queued, and counters (P:counters, as ints)."""
        args = ("EVALSHA", self._metrics.sha, 0)
        try:
            reply = self.redis.call(*args, timeout=timeout_s)
        except connection.ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            reply = self.redis.call("EVAL", self._metrics.source, 0, timeout=timeout_s)
        live, busy, running, queued, flat = reply
        counters = {_s(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        return {"workers": int(live), "busy": int(busy), "running": int(running),
                "queued": int(queued), "counters": counters}

    @translate_errors
    def snapshot(self) -> dict:
        r = self.redis
        names = sorted(_s(n) for n in r.call("SMEMBERS", self.keys.workers))
        jids = [_s(j) for j in r.call("LRANGE", self.keys.jobs, 0, -1)]
        now = int(r.call("TIME")[0])
        commands = []
        for name in names:
            commands += [("HGETALL", self.keys.info(name)), ("PTTL", self.keys.heartbeat(name)),
                         ("HKEYS", self.keys.active(name))]
        for jid in jids:
            commands += [("LLEN", self.keys.queue(jid)), ("HGETALL", self.keys.job(jid))]
        commands += [("GET", self.keys.stats(sec)) for sec in range(now - 59, now + 1)]
        out = r.pipeline(commands)

        def as_dict(flat):
            return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}

        workers = []
        for i, name in enumerate(names):
            info = as_dict(out[3 * i])
            # what the worker holds: the task it runs, and one it may have taken ahead
            held = sorted(_s(k) for k in out[3 * i + 2])
            current = held[0] if held else ""
            if len(held) > 1:
                current += f" (+{len(held) - 1} taken ahead)"
            left = out[3 * i + 1]  # ms of lease left; -2: none
            if left > 0 and info.get("lease"):  # beats between tasks do not write 'seen'
                info["seen"] = f"{time.time() - (float(info['lease']) - left) / 1000:.3f}"
            # 'name' is what the worker reports (readable, not unique), 'id' its key in Redis
            info.update(id=name, name=info.get("name") or name, alive=left != -2,
                        current=current)
            workers.append(info)
        base = 3 * len(names)
        jobs = [{"id": jid, "queued_chunks": out[base + 2 * i], **as_dict(out[base + 2 * i + 1])}
                for i, jid in enumerate(jids)]
        done = sum(int(v) for v in out[base + 2 * len(jids):] if v)
        return {"workers": workers, "jobs": jobs, "items_per_s": done / 60.0}

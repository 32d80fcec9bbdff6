"""`pyworker worker`: a supervisor that holds the worker's place in Redis and runs its tasks in
an executor process that it forks, watches and replaces.

User code exits, crashes, holds the GIL, leaks and hangs. None of that may cost the worker its
lease, its registration or the tasks it holds, so the process that speaks for the worker (lease,
liveness file, reaping dead workers, registration) runs no user code and never unpickles
anything, and the process that does (the executor, worker.Worker) may die: the supervisor then
finds out from the shared board (board.py) which task, and when the task was watched, which item
it was running, and forks a new executor that takes the worker's tasks up again.

- A task that kills its executor is run again item by item (watched), by the next executor; an
  item that kills executors more than PYWORKER_MAX_RETRIES times fails alone with
  WorkerLostError saying how (exit code, signal, the OOM killer and the memory limit), and the
  rest of its chunk is run. A poisoned item uses up no other item's retries.
- A task whose job is gone (cancelled, timed out, abandoned) is stopped within a heartbeat, and
  an item over its time limit (pmap's task_timeout) within 0.2 s: the executor is killed, the
  job's tasks leave the worker's active hash, and the item fails with TaskTimeoutError.
- The executor replaces itself between tasks when PYWORKER_MAX_TASKS_PER_CHILD or
  PYWORKER_MAX_MEMORY_MB say so.

Packages that pyworker.pip_install() asks for (pip.py) are installed here, between tasks: the
supervisor learns of them with its beat, lets the executor finish its task (SIGUSR1), runs pip
while it keeps the lease, and forks a fresh executor that imports the new versions.

Why fork and not a fresh interpreter: a fork is ready in milliseconds with pyworker imported, so
a worker whose task killed its executor takes its next task at once. The supervisor has no
threads (its waits are select() on a pidfd), which is what makes forking it safe. The hot path
is the executor's alone, as before: the supervisor adds no round trip to a task.
"""
from __future__ import annotations

import ctypes
import logging
import os
import random
import select
import signal
import socket
import time

from . import board as boards
from . import config, protocol, serialize, shm, versions
from .board import Board
from .config import Settings
from .errors import ConnectionError as PyworkerConnectionError
from .errors import RedisError, TaskTimeoutError, WorkerLostError
from .pip import WorkerPip
from .queue import Broker
from .worker import TaskLogHandler, TaskPlan, Worker

log = logging.getLogger("pyworker.worker")
POLL_S = 0.2  # how often the board is read while a task runs (time limits)
# An executor that dies this many times in a row without running a task for a while means the
# worker cannot work (Redis refuses it, the machine is out of memory ...): the supervisor exits
# with an error rather than look alive while doing nothing.
MAX_IDLE_DEATHS = 5
HEALTHY_AFTER_S = 10.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_CRASHES = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE}
# Reaping: one worker at a time reaps, for lease/2 (queue.Broker.try_reap). Each worker tries
# every lease/2 times (registered workers / REAPERS_PER_ROUND), at most REAP_TRY_MAX_ROUNDS
# times lease/2: about REAPERS_PER_ROUND tries per lease/2 in all, so a dead worker is found
# about as soon after its lease ended as when every worker reaped every lease/2, and W workers
# cost O(W) commands, not O(W^2).
REAPERS_PER_ROUND = 8
REAP_TRY_MAX_ROUNDS = 10


class Lease:
    """A worker's place in Redis, kept by its supervisor: registration under a unique id
    (protocol.worker_id), the lease's beats, reaping dead workers, registering again, and
    deregistering. No user code and no fork here, so bench.idle runs hundreds of them in one
    process exactly as supervisors do.

    What a beat costs Redis, with nothing to run: one SET (the lease, XX) and one LLEN (of the
    pip_install specs: pip.py) in one round trip, plus, about every W/8 beats, a SET NX that
    elects the reaper. The reaper looks only at the workers due in the
    index of leases (queue._REAP)."""

    def __init__(self, settings: Settings, broker: Broker, info=None,
                 worker_id: str | None = None):
        self.settings = settings
        self.broker = broker
        self.name = protocol.check_name("worker name", settings.worker_name)
        self.id = worker_id or protocol.worker_id(self.name)
        self._info = info or (lambda: {})  # what to register (a function: fields that change)
        self.workers = 1  # registered workers, as last seen: how often to try to reap
        self._next_reap = 0.0
        self.stopping = False

    def info(self) -> dict:
        return {**self._info(), "name": self.name, "lease": int(self.settings.lease_s * 1000)}

    def register(self):
        self.workers = self.broker.register_worker(self.id, self.info())

    def beat(self, running: str | None = None) -> list[str]:
        """Renew the lease (whatever the executor does: it may hold the GIL for minutes); of
        the task ``running``, if its job is gone or its call cancelled, [it]. Now and then, try
        to reap. A lease that had ended (the worker was reaped, or Redis lost its data) comes
        back with a full registration, which also puts it into the reaper's index."""
        b = self.broker
        if running:
            gone, lost = b.keep(self.id, [running])
        else:
            gone, lost = [], not b.renew_lease(self.id)
        if lost and not self.stopping:
            self.register()
            # Reaped, it left the idle stack: its executor, perhaps in a long idle wait, looks
            # for work now and so joins the stack again (a busy one drops the token).
            self.wake()
            log.warning("worker %s: its lease had ended (Redis restarted without persistence, "
                        "or the worker missed its lease); registered again", self.id)
        now = time.monotonic()
        if now >= self._next_reap:
            rounds = min(max(1.0, self.workers / REAPERS_PER_ROUND), REAP_TRY_MAX_ROUNDS)
            # (spread: workers started together must not try together)
            self._next_reap = now + self.settings.lease_s / 2 * rounds * random.uniform(0.8, 1.2)
            got = b.try_reap(self.id)
            if got is not None:
                self.workers, reaped = got
                for dead in reaped:
                    log.info("worker %s: worker %s missed its lease; its tasks were re-queued",
                             self.id, dead)
        return gone

    def wake(self):
        """Wake the executor from its idle wait (it is stopping)."""
        self.broker.wake_worker(self.id)

    def stop(self):
        """Deregister: what the worker still holds goes back to the queue, counting no death."""
        self.stopping = True
        self.broker.deregister_worker(self.id)


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.broker = Broker(settings)
        self.lease = Lease(settings, self.broker, self._info)
        # its id in Redis; logs and status() show it (the name alone may not be unique)
        self.name = self.lease.id
        self.board = Board()
        self.plans: dict[str, TaskPlan] = {}
        self.stopping = 0  # signals received: 1 stop after the task, 2 stop now
        self.pid: int | None = None  # the executor's
        self._pidfd: int | None = None
        self._born = 0.0
        self._killed: tuple | None = None  # why the supervisor killed the executor
        self._idle_deaths = 0
        self._oom_kills = _oom_kills()
        self._started = time.time()
        self.pip = WorkerPip(settings, self.broker, self.name)
        self._making_way = False  # the executor was asked to end after its task (pip_install)
        self._next_beat = 0.0

    # --- lifecycle -----------------------------------------------------------------------------

    def install_signal_handlers(self):
        def on_term(signum, frame):
            self.stopping += 1
            if self.stopping == 1:
                log.info("worker %s: %s received, stopping after the current task",
                         self.name, signal.Signals(signum).name)
            if self.pid is not None:
                try:
                    os.kill(self.pid, signal.SIGTERM)  # twice: the executor stops at once
                except ProcessLookupError:
                    pass

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        # Executors inherit this until they set their own handler: a SIGUSR1 (make way for a
        # pip_install) sent before then is lost, not fatal; it is sent again with each beat.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def _wait_for_redis(self):
        """Redis may start after the workers (pods start in any order; LocalCluster starts
        both at once): retry for reconnect_s, every 20 ms at first and then less often, up to
        every second; one log line per attempt once it has taken a second; a wrong password
        fails at once."""
        start = time.monotonic()
        deadline = start + self.settings.reconnect_s
        pause = 0.02
        while True:
            try:
                return self.broker.ping()
            except PyworkerConnectionError as exc:
                if not exc.retryable or time.monotonic() >= deadline or self.stopping:
                    raise
                if time.monotonic() - start >= 1.0:
                    log.warning("worker %s: %s; retrying", self.name, exc)
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def run(self) -> int:
        b = self.broker
        self._wait_for_redis()
        b.check_eviction_policy()  # a warning in the worker's log if Redis can evict its keys
        # (What a former life of this worker held goes back once its lease has ended: it had
        # another id, so nothing here can take the tasks of a live worker of the same name.)
        store = shm.Store.open(self.settings)
        if store is not None:
            swept = store.sweep()
            if swept:
                log.info("worker %s: removed %d shared-memory segment(s) of callers that are gone",
                         self.name, swept)
        self.lease.register()
        self._touch_heartbeat_file()
        log.info("worker %s started: redis %s, pid %d, python %s, cloudpickle %s, pyworker %s "
                 "(protocol %d)", self.name, b.where, os.getpid(), serialize.PYTHON_VERSION,
                 serialize.CLOUDPICKLE_VERSION, versions.__version__, protocol.PROTOCOL_VERSION)
        code = 0
        try:
            code = self._supervise()
        finally:
            if self.pid is not None:  # (an error in the supervisor itself)
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            try:
                self.lease.stop()  # gives back what it holds, counting no death
            except PyworkerConnectionError as exc:
                log.error("worker %s: could not deregister: %s", self.name, exc)
            log.info("worker %s stopped", self.name)
        return code

    def _supervise(self) -> int:
        hb = self.settings.heartbeat_s
        self._next_beat = time.monotonic()
        woken = False
        # What pip_install asked before this worker started (its registration read how many),
        # before its first task.
        if self.pip.due():
            self._apply_pip()
            if self.stopping:
                return 0
        self._spawn()
        while self.pid is not None:
            now = time.monotonic()
            if now >= self._next_beat:
                self._next_beat = now + hb
                self._beat()
                if not self.stopping and (self._making_way or self.pip.due()):
                    self._make_way()
            if self.stopping and not woken:
                woken = self._wake_idle_executor()
            if self._wait(min(POLL_S, max(0.0, self._next_beat - time.monotonic()))):
                code = self._exited()
                if code is not None:
                    return code
            else:
                self._check_time_limit()
        return 0

    def _info(self) -> dict:
        """What the worker registers (status(), shared memory, hand-offs: queue._SUBMIT)."""
        store_ident = shm.Store.open(self.settings)
        return {
            **self.pip.info(),
            "host": socket.gethostname(), "pid": os.getpid(), "started": f"{self._started:.3f}",
            "done": 0, "seen": f"{time.time():.3f}",
            **versions.local().info(),  # python, cloudpickle, pyworker, protocol, env, packages
            "shm": store_ident.ident if store_ident is not None else "",
            "handoff": "1",  # a submit may hand it a task instead of a token
        }

    # --- the executor --------------------------------------------------------------------------

    def _spawn(self):
        self.board.reset()
        parent = os.getpid()
        # Stop signals wait while it forks: one that came between the fork and the executor's
        # own handlers would run the supervisor's handler in the executor (and be lost there);
        # blocked, it is delivered to whichever process it was sent to once that is ready.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the executor
            code = 1
            try:
                code = _executor(self.settings, self.board, self.plans, parent, self.name,
                                 self.pip.block_since)
            except BaseException:
                log.exception("worker %s: the executor failed", self.name)
            finally:
                os._exit(code)
        self.pid, self._born = pid, time.monotonic()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd (Linux before 5.3): waits poll instead
            self._pidfd = None
        if self.stopping:  # a stop signal came while it was being forked
            os.kill(pid, signal.SIGTERM)
        try:
            self.broker.set_worker_info(self.name, executor=pid)
        except (PyworkerConnectionError, RedisError):  # (a full Redis: OOM) status() only
            pass

    def _wait(self, timeout: float) -> bool:
        """Whether the executor exited within timeout (then self.status is how)."""
        if self._pidfd is not None:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if not ready:
                return False
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            if self._pidfd is None:
                time.sleep(min(timeout, 0.05))
            return False
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self.pid, self.status = None, status
        return True

    def _exited(self) -> int | None:
        """After the executor exited: start another one, or return the supervisor's exit code
        (it stops)."""
        snap = self.board.read()
        killed, self._killed = self._killed, None
        lived = time.monotonic() - self._born
        if killed is not None:
            self._after_kill(killed)
        elif snap.state == boards.RECYCLING:
            pass  # it said why in its log
        elif snap.state == boards.STOPPING or (self.stopping and snap.state == boards.IDLE):
            return 0
        elif self.stopping:
            # Stopping at once (a second signal): what it ran goes back to the queue, uncounted.
            return 0
        elif snap.state == boards.RUNNING and snap.field:
            self._idle_deaths = 0
            self._task_killed_executor(snap, self._how())
        else:
            self._idle_deaths = 0 if lived > HEALTHY_AFTER_S else self._idle_deaths + 1
            log.error("worker %s: its executor died between tasks (%s)", self.name, self._how())
            if self._idle_deaths >= MAX_IDLE_DEATHS:
                log.error("worker %s: %d executors in a row died without running a task; "
                          "giving up", self.name, self._idle_deaths)
                return 1
            time.sleep(min(0.1 * 2 ** self._idle_deaths, 5.0))
        if self.stopping:
            return 0
        self._making_way = False
        if self.pip.due():
            self._apply_pip()
            if self.stopping:
                return 0
        self._prune_plans()
        self._spawn()
        return None

    def _task_killed_executor(self, snap, how: str):
        max_retries = self.settings.max_retries
        plan = self.plans.setdefault(snap.field, TaskPlan())
        if not plan.watch and snap.item < 0:
            plan.watch = True
            log.error("worker %s: task %s killed its executor (%s); running it again item by "
                      "item, to find the item that does", self.name, snap.field, how)
            return
        key = snap.item if snap.item >= 0 else -1
        plan.watch = True
        deaths = plan.deaths[key] = plan.deaths.get(key, 0) + 1
        what = f"item {key} of task {snap.field}" if key >= 0 else f"task {snap.field}"
        if deaths <= max_retries:
            log.error("worker %s: %s killed its executor (%s); running it again (%d of at most "
                      "%d)", self.name, what, how, deaths, max_retries)
            return
        where = "" if key >= 0 else " outside any of its items (loading them, or pickling " \
                                    "their results)"
        plan.failed[key] = serialize.pack_exception(WorkerLostError(
            f"killed the executor running it on worker {self.name}{where} {deaths} times, "
            f"more than PYWORKER_MAX_RETRIES={max_retries} allows; the last time {how}. "
            "The other items of its job were not affected"))
        log.error("worker %s: %s killed its executor %d times (%s); it fails, the rest of its "
                  "chunk runs", self.name, what, deaths, how)

    def _how(self) -> str:
        status = self.status
        if os.WIFEXITED(status):
            return f"the executor exited with code {os.WEXITSTATUS(status)} (os._exit()?)"
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGKILL:
            oom, self._oom_kills = self._oom_kills, _oom_kills()
            limit = _memory_limit()
            limit = f"{limit / 2**20:.0f} MiB" if limit else "not set"
            if self._oom_kills > oom:
                return (f"the kernel's OOM killer killed it: out of memory; the worker's memory "
                        f"limit is {limit}")
            return f"killed by SIGKILL: out of memory? the worker's memory limit is {limit}"
        if sig in _CRASHES:
            return f"the executor crashed with {name} (a fault in C code?)"
        return f"the executor was killed by {name}"

    def _kill(self, why: tuple):
        if self.pid is not None and self._killed is None:
            self._killed = why
            os.kill(self.pid, signal.SIGKILL)

    def _after_kill(self, why: tuple):
        kind, field = why[0], why[1]
        jid = field.split(" ", 1)[0]
        if kind == "gone":
            if self.broker.job_exists(jid):  # only this call was cancelled (Future.cancel)
                self.broker.forget_tasks(self.name, jid, field)
                log.info("worker %s: task %s was cancelled; stopped", self.name, field)
            else:
                n = self.broker.forget_tasks(self.name, jid)
                log.info("worker %s: job %s was cancelled or ended; its running task was "
                         "stopped (%d task(s) dropped)", self.name, jid, n)
            return
        item, limit = why[2], why[3]
        plan = self.plans.setdefault(field, TaskPlan())
        plan.watch = True
        plan.failed[item] = serialize.pack_exception(TaskTimeoutError(
            f"ran longer than its task_timeout of {limit:g} s on worker {self.name} and was "
            "stopped"))
        log.warning("worker %s: item %d of task %s ran longer than %g s; stopped", self.name,
                    item, field, limit)

    def _check_time_limit(self):
        snap = self.board.read()
        if snap.state == boards.RUNNING and snap.item_timeout > 0 and snap.item >= 0 \
                and time.monotonic() - snap.item_started > snap.item_timeout:
            self._kill(("timeout", snap.field, snap.item, snap.item_timeout))

    def _prune_plans(self):
        """Plans for tasks this worker no longer holds are done with."""
        if self.plans:
            try:
                held = self.broker.held_tasks(self.name)
            except (PyworkerConnectionError, RedisError):
                return
            for field in [f for f in self.plans if f not in held]:
                del self.plans[field]

    # --- pip_install ---------------------------------------------------------------------------

    def _make_way(self):
        """pip_install asked for packages: the executor ends after the task it runs (or at
        once, when idle) and the next one starts after pip (_exited). Asked again every beat
        until it has ended: a signal that came before its handler was set is lost."""
        if not self._making_way:
            self._making_way = True
            try:  # pip_install says the worker waits for its task to end
                self.broker.set_worker_info(self.name, pip_want=self.broker.pip_generation)
            except (PyworkerConnectionError, RedisError):
                pass
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return
        if self.board.read().state != boards.RUNNING:
            try:
                self.lease.wake()  # out of its idle wait
            except (PyworkerConnectionError, RedisError):
                pass

    def _apply_pip(self):
        """Run pip for the specs not run yet (no executor runs meanwhile), beating while it
        runs; a stop signal ends it."""
        hb = self.settings.heartbeat_s

        def tick():
            now = time.monotonic()
            if now >= self._next_beat:
                self._next_beat = now + hb
                self._beat()
            if self.stopping:
                raise _Stopping()

        try:
            self.pip.apply(tick)
        except _Stopping:
            pass
        except (PyworkerConnectionError, RedisError) as exc:  # tried again after the next exit
            log.error("worker %s: could not read or report pip_install: %s", self.name, exc)
        except Exception:  # the worker must outlive any surprise here, as its heartbeat does
            log.exception("worker %s: pip_install error", self.name)

    # --- heartbeat -----------------------------------------------------------------------------

    def _wake_idle_executor(self) -> bool:
        """An idle executor waits in Redis for long (worker.IDLE_WAIT_MAX_S): a stopping
        supervisor wakes it (its own wake list), so that it stops at once. One running a task
        stops after it without waiting (it got SIGTERM before). Done: True."""
        if self.pid is None or self.board.read().state == boards.RUNNING:
            return True
        try:
            self.lease.wake()
            return True
        except (PyworkerConnectionError, RedisError):
            return False

    def _beat(self):
        """Every heartbeat: the lease's beat (Lease.beat: renew, now and then reap, register
        again if Redis forgot this worker), touch the liveness file, stop a task whose job is
        gone."""
        try:
            snap = self.board.read()
            running = snap.field if snap.state == boards.RUNNING and snap.field else None
            self.lease.stopping = bool(self.stopping)
            gone = self.lease.beat(running)
            self._touch_heartbeat_file()
            if running and gone and self.board.read().field == running:
                self._kill(("gone", running))
        except (PyworkerConnectionError, RedisError) as exc:
            log.error("worker %s: heartbeat failed: %s", self.name, exc)
        except Exception:  # the heartbeat must outlive any surprise
            log.exception("worker %s: heartbeat error", self.name)

    def _touch_heartbeat_file(self):
        """The liveness probe reads the file's mtime: one system call, after the first."""
        path = self.settings.heartbeat_file
        if path:
            try:
                os.utime(path)
            except FileNotFoundError:
                with open(path, "w") as f:
                    f.write(f"{self.name}\n")


def _executor(settings: Settings, board: Board, plans: dict, parent: int,
              worker_id: str, pip_block: float | None = None) -> int:
    """The executor's life, in the forked child."""
    _die_with(parent)
    config.IN_EXECUTOR = True
    logging.getLogger().addHandler(TaskLogHandler())
    worker = Worker(settings, board=board, plans=plans, worker_id=worker_id,
                    pip_block=pip_block)
    worker.install_signal_handlers()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    code = worker.run()
    if worker.recycle_reason:
        log.info("worker %s: executor %d replaced: %s", worker.name, os.getpid(),
                 worker.recycle_reason)
    return code


class _Stopping(Exception):
    """A stop signal came while pip ran."""


def _die_with(parent: int):
    """The executor gets SIGKILL when its supervisor dies, however it dies (a killed pod, a
    killed LocalCluster): it must not run on, unsupervised, holding the worker's name."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        # its command line is the supervisor's: a name of its own tells the two apart in
        # ps -o comm, top and htop
        libc.prctl(15, b"pyworker-exec")  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _cgroup_file(v2: str, v1: str) -> str | None:
    """The path of a file of this process's memory cgroup (v2 or v1), if there is one."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and os.path.exists(f"/sys/fs/cgroup{path}/{v2}"):
            return f"/sys/fs/cgroup{path}/{v2}"
        if "memory" in controllers.split(","):
            for root in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
                if os.path.exists(f"{root}{path}/{v1}"):
                    return f"{root}{path}/{v1}"
                if os.path.exists(f"{root}/{v1}"):  # a container sees its cgroup as the root
                    return f"{root}/{v1}"
    return None


def _oom_kills() -> int:
    """How many processes the OOM killer has killed in this worker's memory cgroup."""
    path = _cgroup_file("memory.events", "memory.oom_control")
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, TypeError, ValueError):
        pass
    return 0


def _memory_limit() -> int | None:
    """This worker's memory limit in bytes (its cgroup's), None if it has none."""
    path = _cgroup_file("memory.max", "memory.limit_in_bytes")
    try:
        with open(path) as f:
            raw = f.read().strip()
    except (OSError, TypeError):
        return None
    if raw == "max" or not raw.isdigit() or int(raw) >= 2**60:
        return None
    return int(raw)


def main(settings: Settings) -> int:
    supervisor = Supervisor(settings)
    supervisor.install_signal_handlers()
    return supervisor.run()

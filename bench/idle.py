"""`python -m bench.idle --workers 500`: many idle workers in one process, for bench.scale (c).

Real worker processes are too heavy for 500 on 2 cores (two interpreters each). These speak the
real protocol by running pyworker's own code: each executor is a real `worker.Worker` in a
thread (its loop takes tasks, waits on its wake list and the common one, beats with finish), and
one thread does for every worker what a supervisor does between tasks (supervisor.Lease: the
lease, reaping, registering again). Only the fork, the board and signals are left out. The
connection settings come from the PYWORKER_* environment (a LocalCluster's env).

The executors run in a child process (threads), the leases in this one (one thread), as
supervisor and executor are two processes for real. It prints one line "ready <n>" once every
worker is registered, and on SIGTERM (or stdin closing) it deregisters them all, as a stopping
supervisor does, prints how many items the idle workers ran, and exits.
"""
import argparse
import dataclasses
import os
import signal
import sys
import threading
import time

from pyworker.config import Settings
from pyworker.queue import Broker
from pyworker.worker import Worker

TICK_S = 0.1

try:  # this tree's supervisor (the one the worker processes run)
    from pyworker.supervisor import Lease
except ImportError:  # a tree from before supervisor.Lease: what its Supervisor._beat did
    Lease = None


class _OldLease:
    """Supervisor._beat of the code before supervisor.Lease, call for call."""

    def __init__(self, settings, broker, name, info):
        self.settings, self.broker, self.name, self.info = settings, broker, name, info
        self.next_reap = time.monotonic()

    def register(self):
        self.broker.reap(force_name=self.name)
        self.broker.register_worker(self.name, self.info)

    def beat(self, running=None):
        b = self.broker
        gone = b.keep(self.name, [running] if running else [])
        now = time.monotonic()
        if now >= self.next_reap:
            self.next_reap = now + self.settings.lease_s / 2
            b.reap()
            if b.registration_lost(self.name):
                b.register_worker(self.name, self.info)
        return gone

    def stop(self):
        self.broker.deregister_worker(self.name)


def _info(i):
    return {"host": "bench-idle", "pid": os.getpid(), "started": f"{time.time():.3f}",
            "done": 0, "seen": f"{time.time():.3f}", "python": "", "cloudpickle": "",
            "shm": "", "handoff": "1"}


report_w = None  # the executors' process writes how many items they ran here


def _executors(base, leases):
    """The executors' process: a real worker.Worker loop per worker, in threads."""
    broker = Broker(base)  # (its pool grows to one connection per waiting worker)
    workers = []
    for lease in leases:
        if Lease is not None:  # the same worker in Redis as its lease
            w = Worker(lease.settings, broker=broker, worker_id=lease.id)
        else:
            w = Worker(lease.settings, broker=broker)
        threading.Thread(target=w.run, daemon=True).start()
        workers.append(w)
    done = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: done.set())
    done.wait()
    os.write(report_w, f"{sum(w.done for w in workers)}\n".encode())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=500)
    ap.add_argument("--name", default="idle")
    args = ap.parse_args()
    base = Settings.from_env()
    lease_broker = Broker(base)  # the supervisors' beats: one thread, one connection
    leases = []
    global report_w
    report_r, report_w = os.pipe()
    for i in range(args.workers):
        settings = dataclasses.replace(base, worker_name=f"{args.name}-{i}",
                                       heartbeat_file=None, shared_memory=False)
        if Lease is not None:
            lease = Lease(settings, lease_broker, info=lambda i=i: _info(i))
        else:
            lease = _OldLease(settings, lease_broker, settings.worker_name, _info(i))
        lease.register()
        leases.append(lease)
    # The executors run in a process of their own, as they do for real: 500 threads waking in
    # the process that beats would take the GIL from its beats, and leases would lapse.
    child = os.fork()
    if child == 0:
        try:
            _executors(base, leases)
        finally:
            os._exit(0)
    print(f"ready {len(leases)}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    hb = base.heartbeat_s
    # Each worker beats every heartbeat_s, spread over the interval as independent processes'
    # beats would be; this process wakes every TICK_S for those due (Redis sees the same
    # beats; a wake-up every 2 ms would take CPU from the real workers on a 2-core machine,
    # which 500 pods elsewhere would not).
    due = [time.monotonic() + hb * i / len(leases) for i in range(len(leases))]
    while not stop.is_set():
        now = time.monotonic()
        for i, lease in enumerate(leases):
            if due[i] <= now:
                due[i] += hb
                try:
                    lease.beat()
                except Exception as exc:  # a beat that fails is a missed beat, as for real
                    print(f"beat failed: {exc}", file=sys.stderr, flush=True)
        stop.wait(TICK_S)
    os.kill(child, signal.SIGUSR1)  # the executors: how many tasks they ran, then exit
    ran = 0
    try:
        ran = int(os.read(report_r, 64).decode().strip() or 0)
    except (OSError, ValueError):
        pass
    os.waitpid(child, 0)
    for lease in leases:
        try:
            lease.stop()
        except Exception as exc:
            print(f"deregister failed: {exc}", file=sys.stderr, flush=True)
    print(f"stopped; the idle workers ran {ran} items", flush=True)
    os._exit(0)  # executor threads blocked in a wait go with the process


if __name__ == "__main__":
    main()

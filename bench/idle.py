"""`python -m bench.idle --workers 500`: many idle workers in one process, for bench.scale (c).

Real worker processes are too heavy for 500 on 2 cores (two interpreters each). These speak the
real protocol by running pyworker's own code: each executor is a real `worker.Worker` in a
thread (its loop takes tasks, waits on its wake list and the common one, beats with finish), and
one thread does for every worker what a supervisor does between tasks (supervisor.Lease: the
lease, reaping, registering again). Only the fork, the board and signals are left out. The
connection settings come from the PYWORKER_* environment (a LocalCluster's env).

It prints one line "ready <n>" once every worker is registered, and on SIGTERM (or stdin
closing) it deregisters them all, as a stopping supervisor does, and exits.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=500)
    ap.add_argument("--name", default="idle")
    args = ap.parse_args()
    base = Settings.from_env()
    lease_broker = Broker(base)  # the supervisors' beats: one thread, one connection
    leases, workers = [], []
    for i in range(args.workers):
        settings = dataclasses.replace(base, worker_name=f"{args.name}-{i}",
                                       heartbeat_file=None, shared_memory=False)
        if Lease is not None:
            lease = Lease(settings, lease_broker, info=_info(i))
        else:
            lease = _OldLease(settings, lease_broker, settings.worker_name, _info(i))
        lease.register()
        leases.append(lease)
    # The executors share one broker (its pool grows to one connection per waiting worker).
    exec_broker = Broker(base)
    for lease in leases:
        w = Worker(dataclasses.replace(lease.settings), broker=exec_broker)
        if Lease is not None:
            w.instance = lease.instance  # the same worker in Redis as its lease
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        workers.append(w)
    print(f"ready {len(leases)}", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    hb = base.heartbeat_s
    # Each worker beats every heartbeat_s, spread over the interval as independent processes'
    # beats would be.
    due = [time.monotonic() + hb * i / len(leases) for i in range(len(leases))]
    while not stop.is_set():
        now = time.monotonic()
        for i, lease in enumerate(leases):
            if due[i] <= now:
                due[i] = now + hb
                try:
                    lease.beat()
                except Exception as exc:  # a beat that fails is a missed beat, as for real
                    print(f"beat failed: {exc}", file=sys.stderr, flush=True)
        stop.wait(max(0.0, min(due) - time.monotonic()))
    for w in workers:
        w.stopping.set()
    for lease in leases:
        try:
            lease.stop()
        except Exception as exc:
            print(f"deregister failed: {exc}", file=sys.stderr, flush=True)
    print("stopped", flush=True)
    os._exit(0)  # executor threads blocked in a wait go with the process


if __name__ == "__main__":
    main()

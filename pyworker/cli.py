"""`pyworker worker | local | status | metrics | health`. Every worker option is also a PYWORKER_* variable."""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
import time

from ._version import __version__
from .config import Settings
from .errors import PyworkerError

DEFAULT_HEARTBEAT_FILE = "/tmp/pyworker-heartbeat"


def _worker(args) -> int:
    from .supervisor import main as worker_main
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    settings = Settings.from_env(
        redis_url=args.redis_url, worker_name=args.name, lease_s=args.lease_s,
        max_retries=args.max_retries, heartbeat_file=args.heartbeat_file)
    if settings.heartbeat_file is None:
        settings.heartbeat_file = DEFAULT_HEARTBEAT_FILE
    return worker_main(settings)


def _status(args) -> int:
    from .status import status
    print(status())
    return 0


def _metrics(args) -> int:
    from .metrics import serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if not 0 <= args.port <= 65535:
        print(f"pyworker metrics: --port {args.port} is not a port (0-65535)", file=sys.stderr)
        return 2
    if not args.timeout > 0:
        print(f"pyworker metrics: --timeout must be greater than 0, not {args.timeout:g}",
              file=sys.stderr)
        return 2
    return serve(Settings.from_env(redis_url=args.redis_url), args.host, args.port, args.timeout)


def _health(args) -> int:
    path = args.file or os.environ.get("PYWORKER_HEARTBEAT_FILE") or DEFAULT_HEARTBEAT_FILE
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        print(f"unhealthy: no heartbeat file at {path} (worker not started?)", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"unhealthy: last heartbeat {age:.0f} s ago (limit {args.max_age:g} s)",
              file=sys.stderr)
        return 1
    print(f"healthy: last heartbeat {age:.1f} s ago")
    return 0


def _lab_answers(url: str) -> bool:
    import urllib.request  # here: every worker and healthcheck starts through this module
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def _local(args) -> int:
    from .local import LocalCluster, _wait, free_port, with_parent
    from .startup import write_startup_file
    if args.lab and not _has_module("jupyterlab"):  # it runs as `sys.executable -m jupyterlab`
        print(f"pyworker local --lab needs JupyterLab in {sys.executable}: "
              "pip install 'pyworker[lab]'", file=sys.stderr)
        return 2
    cluster = LocalCluster(args.workers, quiet=False)
    lab = None
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1) or (_ for _ in ()).throw(
        KeyboardInterrupt()))
    print(f"pyworker {__version__}: starting Redis and {args.workers} worker(s)...", flush=True)
    try:
        cluster.start()
        print(f"  redis   {cluster.redis.local_url} (password protected, this machine only)")
        print(f"  workers {args.workers} ready; logs in {cluster.redis.dir}")
        print("  to use it from another shell on this machine:")
        for key, value in cluster.env.items():
            print(f"    export {key}={value}")
        if args.lab:
            port = args.port or free_port()
            token = secrets.token_urlsafe(24)
            startup = write_startup_file(cluster.redis.dir)
            env = {**os.environ, **cluster.env, "JUPYTER_TOKEN": token, "PYTHONSTARTUP": startup}
            log = open(os.path.join(cluster.redis.dir, "lab.log"), "w")
            lab = subprocess.Popen(with_parent(
                [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                 f"--ServerApp.port={port}", f"--ServerApp.root_dir={args.notebook_dir}",
                 # No outside calls: no news feed, no PyPI update check.
                 "--LabApp.news_url=None",
                 "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
                # root (containers, CI): Jupyter refuses without this; it stays on loopback
                # behind a token either way.
                + (["--allow-root"] if os.geteuid() == 0 else [])),
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            print("  starting JupyterLab...", flush=True)
            _wait(lambda: _lab_answers(f"http://127.0.0.1:{port}/api"), 90, "JupyterLab", lab,
                  log.name)
            print(f"\nOpen JupyterLab: http://127.0.0.1:{port}/lab?token={token}")
            print("In a notebook, with no import:  pmap(lambda x: x * x, range(10))")
        else:
            print("\nIn Python:  from pyworker import pmap; pmap(lambda x: x * x, range(10))")
        print("Press Ctrl-C to stop everything.", flush=True)
        # A worker that dies is replaced by the cluster (and says so); only Redis or the Lab
        # going away ends this.
        while cluster.redis.proc.poll() is None and (lab is None or lab.poll() is None):
            time.sleep(0.5)
        what = "redis-server" if cluster.redis.proc.poll() is not None else "JupyterLab"
        print(f"pyworker local: {what} exited unexpectedly; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    except PyworkerError as exc:
        print(f"pyworker local: {exc}", file=sys.stderr)
        return 1
    finally:
        if lab is not None and lab.poll() is None:
            lab.terminate()
            try:
                lab.wait(15)
            except subprocess.TimeoutExpired:
                lab.kill()
        cluster.stop()


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyworker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pyworker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="run a worker (what the worker pods run)",
                       description="Run tasks from Redis until SIGTERM; then finish the current "
                                   "task and exit. Options default to PYWORKER_* variables.")
    w.add_argument("--redis-url", help="default: PYWORKER_REDIS_URL (password: "
                                       "PYWORKER_REDIS_PASSWORD, signing key: PYWORKER_SECRET)")
    w.add_argument("--name", help="worker name (default: PYWORKER_WORKER_NAME or host-pid)")
    w.add_argument("--lease-s", type=float, help="seconds without heartbeat before this "
                                                 "worker's task runs elsewhere (PYWORKER_LEASE_S)")
    w.add_argument("--max-retries", type=int, help="PYWORKER_MAX_RETRIES")
    w.add_argument("--heartbeat-file", help="touched every heartbeat, for liveness probes "
                                            f"(PYWORKER_HEARTBEAT_FILE, default {DEFAULT_HEARTBEAT_FILE})")
    w.add_argument("--quiet", action="store_true", help="log errors only")
    w.set_defaults(func=_worker)

    loc = sub.add_parser("local", help="Redis + N workers (+ JupyterLab) on this machine")
    loc.add_argument("--workers", "-n", type=int, default=os.cpu_count() or 2)
    loc.add_argument("--lab", action="store_true", help="also start JupyterLab with pyworker "
                                                        "registered in every kernel")
    loc.add_argument("--port", type=int, default=None, help="JupyterLab port (default: free)")
    loc.add_argument("--notebook-dir", default=os.getcwd())
    loc.set_defaults(func=_local)

    st = sub.add_parser("status", help="workers, queued jobs and throughput")
    st.set_defaults(func=_status)

    m = sub.add_parser("metrics", help="serve Prometheus metrics and autoscaling figures",
                       description="An HTTP exporter of what Redis says about workers and "
                                   "queues: GET /metrics (Prometheus text), /scale (JSON: "
                                   "tasks queued + running, for autoscalers), /healthz. Needs "
                                   "PYWORKER_REDIS_URL (and PYWORKER_REDIS_PASSWORD), not the "
                                   "signing key.")
    m.add_argument("--port", type=int, default=9090, help="default 9090")
    m.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    m.add_argument("--redis-url", help="default: PYWORKER_REDIS_URL")
    m.add_argument("--timeout", type=float, default=5.0,
                   help="seconds a scrape may wait for Redis before it answers 503 (default 5)")
    m.set_defaults(func=_metrics)

    h = sub.add_parser("health", help="exit 0 if this machine's worker heart-beat recently")
    h.add_argument("--max-age", type=float, default=30.0, help="seconds (default 30)")
    h.add_argument("--file", help=f"heartbeat file (default {DEFAULT_HEARTBEAT_FILE})")
    h.set_defaults(func=_health)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PyworkerError as exc:
        print(f"pyworker {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

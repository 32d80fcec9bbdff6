"""`pyworker metrics`: an always-on HTTP exporter of what Redis says about the workers and the
queues, for Prometheus (GET /metrics) and for autoscalers (GET /scale, JSON; KEDA's metrics-api
scaler reads its "tasks"). It exposes counts only: no task, function, name or key.

Each answer costs one Redis round trip (Broker.metrics, a read-only script), bounded by
``timeout_s``; answers within SAMPLE_MAX_AGE_S of each other share one sample, so Prometheus and
KEDA polling together do not add up. Redis out of reach: 503 with the reason, never a stale number
(an autoscaler must not scale on a figure from before an outage).

The counters (tasks and items done and failed, run times) live in Redis (P:counters), written by
the executors' beats: they lag the work by up to a heartbeat interval, survive this exporter's
restarts, and start again from zero only when Redis loses its data (Prometheus' rate() takes that
as a counter reset).
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import protocol
from .config import Settings
from .errors import PyworkerError
from .queue import Broker

log = logging.getLogger("pyworker.metrics")

DEFAULT_PORT = 9090
SAMPLE_MAX_AGE_S = 0.5
GROUP = "default"  # worker groups come later: every figure is the default group's for now
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Exporter:
    """Samples Redis (one round trip per sample, shared by answers close in time)."""

    def __init__(self, settings: Settings, timeout_s: float = 5.0, broker: Broker | None = None):
        self.timeout_s = timeout_s
        # No signing key: the exporter reads counts and signs nothing (Broker need_secret).
        self.broker = broker or Broker(settings, need_secret=False, timeout_s=timeout_s)
        self._lock = threading.Lock()
        self._sample: tuple[float, dict] | None = None

    def sample(self) -> dict:
        """Broker.metrics' figures; raises PyworkerError (Redis out of reach, refused)."""
        with self._lock:
            now = time.monotonic()
            if self._sample is not None and now - self._sample[0] < SAMPLE_MAX_AGE_S:
                return self._sample[1]
            figures = self.broker.metrics(self.timeout_s)
            self._sample = (time.monotonic(), figures)
            return figures

    def close(self):
        self.broker.close()


def scale_figures(sample: dict) -> dict:
    """What /scale answers: "tasks" (queued + running) is what an autoscaler scales on."""
    return {"tasks": sample["queued"] + sample["running"], "queued": sample["queued"],
            "running": sample["running"], "workers": sample["workers"], "busy": sample["busy"]}


def _labels(group: str, **more) -> str:
    pairs = [("group", group), *more.items()]
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


def prometheus_text(sample: dict, group: str = GROUP) -> str:
    """The sample in Prometheus' text format (0.0.4)."""
    c = sample["counters"]
    g = _labels(group)
    lines = []

    def metric(name, kind, text, value, labels=g):
        lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"])

    metric("pyworker_workers", "gauge", "Workers with a live lease.", sample["workers"])
    metric("pyworker_workers_busy", "gauge", "Live workers holding a task.", sample["busy"])
    metric("pyworker_tasks_queued", "gauge",
           "Tasks (chunks of items) waiting in the queues for a worker.", sample["queued"])
    metric("pyworker_tasks_running", "gauge",
           "Tasks held by live workers: running, or taken ahead to run next.", sample["running"])
    tasks, failed = c.get("tasks", 0), c.get("tasks_failed", 0)
    items, items_failed = c.get("items", 0), c.get("items_failed", 0)
    metric("pyworker_tasks_done_total", "counter",
           "Tasks finished with no item raising.", tasks - failed)
    metric("pyworker_tasks_failed_total", "counter",
           "Tasks finished with an item that raised (or that failed as a whole).", failed)
    metric("pyworker_items_done_total", "counter",
           "Items whose call returned.", items - items_failed)
    metric("pyworker_items_failed_total", "counter", "Items whose call raised.", items_failed)
    name = "pyworker_task_duration_seconds"
    lines += [f"# HELP {name} How long tasks ran on a worker (their items' calls).",
              f"# TYPE {name} histogram"]
    cumulative = 0
    n_buckets = len(protocol.TASK_SECONDS_BUCKETS)
    for i, bound in enumerate(protocol.TASK_SECONDS_BUCKETS):
        cumulative += c.get(protocol.bucket_field(i), 0)
        lines.append(f"{name}_bucket{_labels(group, le=f'{bound:g}')} {cumulative}")
    cumulative += c.get(protocol.bucket_field(n_buckets), 0)
    lines.append(f"{name}_bucket{_labels(group, le='+Inf')} {cumulative}")
    lines.append(f"{name}_sum{g} {c.get('run_us', 0) / 1e6:.6f}")
    lines.append(f"{name}_count{g} {cumulative}")
    return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    server_version = "pyworker-metrics"
    exporter: Exporter  # set on the subclass made by make_server

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._answer(200, "text/plain; charset=utf-8", "ok\n")
            return
        if path not in ("/metrics", "/scale"):
            self._answer(404, "text/plain; charset=utf-8",
                         "not found: GET /metrics (Prometheus), /scale (JSON) or /healthz\n")
            return
        try:
            sample = self.exporter.sample()
        except PyworkerError as exc:
            log.warning("pyworker metrics: %s", exc)
            if path == "/scale":
                self._answer(503, "application/json", json.dumps({"error": str(exc)}) + "\n")
            else:
                self._answer(503, "text/plain; charset=utf-8", f"pyworker metrics: {exc}\n")
            return
        if path == "/scale":
            self._answer(200, "application/json", json.dumps(scale_figures(sample)) + "\n")
        else:
            self._answer(200, PROMETHEUS_TYPE, prometheus_text(sample))

    def _answer(self, status: int, content_type: str, body: str):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the scraper gave up: nobody to tell
            pass

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)


def make_server(exporter: Exporter, host: str = "0.0.0.0", port: int = DEFAULT_PORT):
    """A threaded HTTP server for the exporter (port 0: a free one, server.server_address)."""
    handler = type("Handler", (_Handler,), {"exporter": exporter})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(settings: Settings, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
          timeout_s: float = 5.0) -> int:
    """Serve until SIGTERM or SIGINT."""
    exporter = Exporter(settings, timeout_s)
    server = make_server(exporter, host, port)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("pyworker metrics: serving /metrics, /scale and /healthz on %s:%d (Redis at %s)",
             host, server.server_address[1], exporter.broker.where)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        exporter.close()
    return 0

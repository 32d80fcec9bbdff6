"""`pyworker metrics`: an always-on HTTP exporter of what Redis says about the workers and the
queues, for Prometheus (GET /metrics) and for autoscalers (GET /scale, JSON; KEDA's metrics-api
scaler reads its "tasks"). It exposes counts only: no task, function, name or key.

Figures are per worker group (label ``group``; /scale?group=gpu, default "default"). Each
group's costs one Redis round trip (Broker.metrics, a read-only script), bounded by
``timeout_s``, and /metrics one more for the list of groups; answers within SAMPLE_MAX_AGE_S of
each other share one sample, so Prometheus and KEDA polling together do not add up. Redis out of reach: 503 with the reason, never a stale number
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
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import config, protocol
from .config import Settings
from .errors import PyworkerError
from .queue import Broker

log = logging.getLogger("pyworker.metrics")

DEFAULT_PORT = 9090
SAMPLE_MAX_AGE_S = 0.5
GROUP = "default"  # /scale without ?group=
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Exporter:
    """Samples Redis, one round trip per worker group (and one for the list of groups), shared
    by answers close in time."""

    def __init__(self, settings: Settings, timeout_s: float = 5.0, broker: Broker | None = None,
                 groups: tuple[str, ...] = ()):
        self.timeout_s = timeout_s
        self.settings = settings.for_group(config.DEFAULT_GROUP)
        # No signing key: the exporter reads counts and signs nothing (Broker need_secret).
        self.broker = broker or Broker(self.settings, need_secret=False, timeout_s=timeout_s)
        # Groups always reported (the chart's workerGroups): a group with no worker yet, which
        # the autoscaler must be able to start from zero, has never registered in P:groups.
        self.groups = tuple(dict.fromkeys((config.DEFAULT_GROUP, *groups)))
        self._brokers: dict[str, Broker] = {config.DEFAULT_GROUP: self.broker}
        self._lock = threading.Lock()
        self._samples: dict[str, tuple[float, dict]] = {}
        self._listed: tuple[float, list[str]] | None = None

    def _broker(self, group: str) -> Broker:
        broker = self._brokers.get(group)
        if broker is None:
            broker = self._brokers[group] = Broker(self.settings.for_group(group),
                                                   need_secret=False, timeout_s=self.timeout_s)
        return broker

    def sample(self, group: str = GROUP) -> dict:
        """One group's figures (Broker.metrics); raises PyworkerError (Redis out of reach,
        refused)."""
        with self._lock:
            now = time.monotonic()
            cached = self._samples.get(group)
            if cached is not None and now - cached[0] < SAMPLE_MAX_AGE_S:
                return cached[1]
            figures = self._broker(group).metrics(self.timeout_s)
            self._samples[group] = (time.monotonic(), figures)
            return figures

    def all_groups(self) -> list[str]:
        """The groups to report: the configured ones and every group workers registered in."""
        with self._lock:
            now = time.monotonic()
            if self._listed is None or now - self._listed[0] >= SAMPLE_MAX_AGE_S:
                self._listed = (now, self.broker.groups())
            return list(dict.fromkeys((*self.groups, *self._listed[1])))

    def close(self):
        for broker in self._brokers.values():
            broker.close()


def scale_figures(sample: dict) -> dict:
    """What /scale answers: "tasks" (queued + running) is what an autoscaler scales on."""
    return {"tasks": sample["queued"] + sample["running"], "queued": sample["queued"],
            "running": sample["running"], "workers": sample["workers"], "busy": sample["busy"]}


def _labels(group: str, **more) -> str:
    pairs = [("group", group), *more.items()]
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


def prometheus_text(sample: dict, group: str = GROUP) -> str:
    """The sample in Prometheus' text format (0.0.4)."""
    return prometheus_groups({group: sample})


def prometheus_groups(samples: dict[str, dict]) -> str:
    """Samples of several groups in Prometheus' text format (0.0.4): each metric's HELP and
    TYPE once, then a line per group."""
    lines = []
    families: dict[str, tuple[str, str, list[str]]] = {}

    def metric(name, kind, text, value, labels):
        values = families.setdefault(name, (kind, text, []))[2]
        if value is None:  # a histogram's lines, made whole
            values.extend(labels)
        else:
            values.append(f"{name}{labels} {value}")

    for group, sample in samples.items():
        _group_metrics(sample, group, metric)
    for name, (kind, text, values) in families.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *values]
    return "\n".join(lines) + "\n"


def _group_metrics(sample: dict, group: str, emit) -> None:
    c = sample["counters"]
    g = _labels(group)

    def metric(name, kind, text, value, labels=g):
        emit(name, kind, text, value, labels)

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
    text = "How long tasks ran on a worker (their items' calls)."
    hist = []
    cumulative = 0
    n_buckets = len(protocol.TASK_SECONDS_BUCKETS)
    for i, bound in enumerate(protocol.TASK_SECONDS_BUCKETS):
        cumulative += c.get(protocol.bucket_field(i), 0)
        hist.append(f"{name}_bucket{_labels(group, le=f'{bound:g}')} {cumulative}")
    cumulative += c.get(protocol.bucket_field(n_buckets), 0)
    hist.append(f"{name}_bucket{_labels(group, le='+Inf')} {cumulative}")
    hist.append(f"{name}_sum{g} {c.get('run_us', 0) / 1e6:.6f}")
    hist.append(f"{name}_count{g} {cumulative}")
    emit(name, "histogram", text, None, hist)


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
        query = urllib.parse.parse_qs(self.path.split("?", 1)[1] if "?" in self.path else "")
        group = (query.get("group") or [GROUP])[-1]
        if not config.GROUP_NAME.match(group):
            self._answer(400, "text/plain; charset=utf-8",
                         f"not a worker group name: {group!r} (?group=default, ?group=gpu)\n")
            return
        try:
            if path == "/scale":
                sample = self.exporter.sample(group)
            else:
                samples = {g: self.exporter.sample(g) for g in self.exporter.all_groups()}
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
            self._answer(200, PROMETHEUS_TYPE, prometheus_groups(samples))

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
          timeout_s: float = 5.0, groups: tuple[str, ...] = ()) -> int:
    """Serve until SIGTERM or SIGINT."""
    exporter = Exporter(settings, timeout_s, groups=groups)
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

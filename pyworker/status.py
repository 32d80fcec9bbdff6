"""pyworker.status(): workers, queued work and throughput, as text and as HTML for notebooks."""
from __future__ import annotations

import time


class Status:
    def __init__(self, snapshot: dict, where: str, desired: int | None = None):
        self.where = where
        # the worker pods the cluster wants (a release's Lab: its Deployment's replicas), or None
        self.desired = desired
        self.workers = snapshot["workers"]
        self.jobs = snapshot["jobs"]
        self.items_per_s = snapshot["items_per_s"]

    @property
    def alive(self) -> list[dict]:
        return [w for w in self.workers if w.get("alive")]

    def _counts(self) -> str:
        wanted = "" if self.desired is None else f" of {self.desired} desired"
        return f"{len(self.alive)} worker(s) alive{wanted}"

    def _worker_rows(self):
        now = time.time()
        names = [w["name"] for w in self.workers]
        for w in self.workers:
            seen = float(w.get("seen") or 0)
            state = "alive" if w.get("alive") else "lease expired"
            if w.get("refused"):  # Worker._refuse: it gives back what it cannot verify
                state += (f", signing key differs: gave back {w['refused']} task(s) it could "
                          "not verify (check its PYWORKER_SECRET)")
            # the name a worker reports; its id in Redis when another reports the same
            shown = w.get("id", w["name"]) if names.count(w["name"]) > 1 else w["name"]
            yield (shown, w.get("host", ""), w.get("pid", ""),
                   w.get("current") or "idle", w.get("done", "0"),
                   f"{now - seen:.1f} s ago" if seen else "never", state)

    def __str__(self):
        lines = [f"pyworker at {self.where}: {self._counts()}, "
                 f"{len(self.jobs)} job(s) with queued work, "
                 f"{self.items_per_s:.1f} items/s over the last minute"]
        if self.workers:
            lines.append(f"  {'worker':<28} {'host':<20} {'pid':>7} {'current':<26} {'done':>8}"
                         f"  heartbeat")
            for name, host, pid, cur, done, seen, state in self._worker_rows():
                lines.append(f"  {name:<28} {host:<20} {pid:>7} {cur:<26} {done:>8}  {seen}"
                             + ("" if state == "alive" else f" ({state})"))
        for job in self.jobs:
            lines.append(f"  job {job['id']}: {job['queued_chunks']} chunk(s) queued"
                         f" (caller {job.get('caller', '?')})")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self):
        from html import escape as e
        head = "".join(f"<th>{h}</th>" for h in
                       ("worker", "host", "pid", "current task", "tasks done", "last heartbeat",
                        "state"))
        rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>"
                       for row in self._worker_rows())
        jobs = "".join(f"<li><code>{e(j['id'])}</code>: {j['queued_chunks']} chunk(s) queued</li>"
                       for j in self.jobs) or "<li>no queued work</li>"
        return (f"<div><b>pyworker</b> at <code>{e(self.where)}</code>: "
                f"{self._counts()}, {self.items_per_s:.1f} items/s over the "
                f"last minute<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
                f"<ul>{jobs}</ul></div>")


def status(client=None) -> Status:
    from .api import get_client
    from .scaling import desired_workers
    client = client or get_client()
    return Status(client.broker.snapshot(), client.broker.where, desired_workers())

"""pyworker.status(): workers, queued work and throughput, as text and as HTML for notebooks."""
from __future__ import annotations

import time


class Status:
    def __init__(self, snapshot: dict, where: str, desired: int | None = None,
                 groups: list[str] | None = None):
        self.where = where
        # the worker pods the cluster wants (a release's Lab: its Deployment's replicas), or None
        self.desired = desired
        # worker groups (a column of their own when there are several)
        self.groups = groups or ["default"]
        self.workers = snapshot["workers"]
        self.jobs = snapshot["jobs"]
        self.items_per_s = snapshot["items_per_s"]

    @property
    def alive(self) -> list[dict]:
        return [w for w in self.workers if w.get("alive")]

    def _counts(self) -> str:
        wanted = "" if self.desired is None else f" of {self.desired} desired"
        by_group = ""
        if len(self.groups) > 1:
            by_group = " (" + ", ".join(
                f"{g}: {sum(1 for w in self.alive if w.get('group') == g)}"
                for g in self.groups) + ")"
        return f"{len(self.alive)} worker(s) alive{wanted}{by_group}"

    def _worker_rows(self):
        now = time.time()
        names = [w["name"] for w in self.workers]
        for w in self.workers:
            seen = float(w.get("seen") or 0)
            state = "alive" if w.get("alive") else "lease expired"
            if w.get("refused"):  # Worker._refuse: it gives back what it cannot verify
                state += (f", signing key differs: gave back {w['refused']} task(s) it could "
                          "not verify (check its PYWORKER_SECRET)")
            if w.get("pip_ok") == "0":  # pip.py: it gives back tasks of jobs started since
                error = (w.get("pip_error") or "").strip().splitlines()
                state += ", pip_install failed" + (f": {error[-1]}" if error else "")
            # the name a worker reports; its id in Redis when another reports the same
            shown = w.get("id", w["name"]) if names.count(w["name"]) > 1 else w["name"]
            if len(self.groups) > 1:
                shown = f"{shown} [{w.get('group', 'default')}]"
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
            for w, (name, host, pid, cur, done, seen, state) in zip(self.workers,
                                                                     self._worker_rows()):
                lines.append(f"  {name:<28} {host:<20} {pid:>7} {cur:<26} {done:>8}  {seen}"
                             + ("" if state == "alive" else f" ({state})"))
                if w.get("pip_packages"):  # what pyworker.pip_install() added there
                    lines.append(f"      extra packages: {w['pip_packages']}")
        for job in self.jobs:
            group = f" [group {job['group']}]" if len(self.groups) > 1 else ""
            lines.append(f"  job {job['id']}{group}: {job['queued_chunks']} chunk(s) queued"
                         f" (caller {job.get('caller', '?')})")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self):
        from html import escape as e
        head = "".join(f"<th>{h}</th>" for h in
                       ("worker", "host", "pid", "current task", "tasks done", "last heartbeat",
                        "state", "extra packages"))
        rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>"
                                        for c in (*row, w.get("pip_packages", ""))) + "</tr>"
                       for w, row in zip(self.workers, self._worker_rows()))
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
    desired = desired_workers()
    groups = client.groups()
    if groups == [client.group]:
        return Status(client.broker.snapshot(), client.broker.where, desired)
    merged = {"workers": [], "jobs": [], "items_per_s": 0.0}
    for group in groups:
        snap = client.for_group(group).broker.snapshot()
        merged["workers"] += [{**w, "group": group} for w in snap["workers"]]
        merged["jobs"] += [{**j, "group": group} for j in snap["jobs"]]
        merged["items_per_s"] += snap["items_per_s"]
    return Status(merged, client.broker.where, desired, groups)

"""Settings, from PYWORKER_* environment variables or keyword arguments. Units are in the names."""
from __future__ import annotations

import dataclasses
import os
import re
import socket
from dataclasses import dataclass, field

from .errors import ConfigurationError

ENV_PREFIX = "PYWORKER_"
MIN_SECRET_BYTES = 16  # the signing key's least length
# True in a worker's executor, the process that runs tasks (supervisor.py): a pmap there runs
# in the task itself (api._nested).
IN_EXECUTOR = False


def _default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Settings:
    redis_url: str | None = None
    redis_password: str | None = None
    # An ACL user (Redis 6+); the URL's user, if it has one, otherwise.
    redis_username: str | None = None
    # TLS (a rediss:// URL): the CA bundle that signed the server's certificate (else the
    # system's), and a client certificate and key for servers that ask for one (mutual TLS).
    redis_ca_file: str | None = None
    redis_cert_file: str | None = None
    redis_key_file: str | None = None
    # Redis Sentinel: "host:port,host:port" of the sentinels and the name of the master they
    # watch; the URL then only gives the database (redis:///0) and its password the master's.
    # A failover is waited out (PYWORKER_RECONNECT_S) like any outage.
    redis_sentinels: str | None = None
    redis_sentinel_master: str | None = None
    redis_sentinel_password: str | None = None
    secret: str | None = None
    prefix: str = "pyw"
    # A worker whose heartbeat is older than this is dead; its task runs again elsewhere.
    lease_s: float = 5.0
    heartbeat_s: float = 1.0
    # How many times a task may be re-run after the worker running it died.
    max_retries: int = 3
    # A job's keys expire this long after its caller stopped keeping them alive.
    job_ttl_s: float = 120.0
    max_message_mb: float = 256.0
    forward_output: bool = True
    connect_timeout_s: float = 5.0
    # A caller or worker that lost Redis retries for this long before giving up.
    reconnect_s: float = 30.0
    # A call of one chunk busy-polls for its result this long before it blocks: on a machine
    # whose cores go idle meanwhile (a VM above all), waking one costs more than a short task
    # takes. 0 turns it off; single-core machines never spin.
    spin_s: float = 0.002
    # Idle workers wake at least this often to check for work and stop requests.
    idle_wait_s: float = 1.0
    # A worker replaces its executor (the process that runs tasks) between tasks once it has
    # run this many tasks, or once its resident memory passed this many MiB (0: never).
    max_tasks_per_child: int = 0
    max_memory_mb: float = 0.0
    worker_name: str = field(default_factory=_default_worker_name)
    heartbeat_file: str | None = None
    # Payloads over protocol.INLINE_MAX_BYTES travel through files in shm_dir/pyworker-<uid>
    # instead of Redis when caller and worker share the host (proven, never assumed; shm.py).
    shared_memory: bool = True
    shm_dir: str = "/dev/shm"
    # The caller's own modules (not installed packages: ship.py) travel with its functions,
    # by value, so workers without them run them.
    ship_modules: bool = True

    def __repr__(self):
        # Never the secret or the Redis password, which a notebook's output or a log would keep:
        # whether they are set, and the URL without its userinfo.
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value:
                value = "<set>"
            elif f.name == "redis_url" and value:
                value = url_without_password(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    def __post_init__(self):
        positive = ("lease_s", "heartbeat_s", "job_ttl_s", "max_message_mb", "connect_timeout_s",
                    "reconnect_s", "idle_wait_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{ENV_PREFIX}{name.upper()} must be greater than 0, "
                                         f"not {getattr(self, name)!r}")
        if not self.spin_s >= 0:
            raise ConfigurationError(f"{ENV_PREFIX}SPIN_S must be 0 (off) or more, "
                                     f"not {self.spin_s!r}")
        for name in ("max_tasks_per_child", "max_memory_mb"):
            if not getattr(self, name) >= 0:
                raise ConfigurationError(f"{ENV_PREFIX}{name.upper()} must be 0 (off) or more, "
                                         f"not {getattr(self, name)!r}")
        if self.max_retries < 0:
            raise ConfigurationError(f"{ENV_PREFIX}MAX_RETRIES must be 0 or more, "
                                     f"not {self.max_retries!r}")
        # Several heartbeats per lease, so one slow beat does not declare a live worker dead.
        self.heartbeat_s = min(self.heartbeat_s, self.lease_s / 3)

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Settings":
        env = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        if "redis_url" not in values:
            url = _url_from_service_env(env)
            if url:
                values["redis_url"] = url
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown pyworker setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def require_connection(self, secret: bool = True) -> None:
        """``secret=False``: a reader that signs and opens no message (the metrics exporter),
        which had better not hold the key that makes workers run code."""
        missing = []
        if not self.redis_url:
            missing.append("PYWORKER_REDIS_URL (e.g. redis://host:6379/0)")
        if secret and not self.secret:
            missing.append("PYWORKER_SECRET (the key that signs every message)")
        if self.secret and len(self.secret.encode()) < MIN_SECRET_BYTES:
            # A short key can be guessed offline from any one signed message in Redis.
            raise ConfigurationError(
                f"PYWORKER_SECRET is {len(self.secret.encode())} byte(s) long; it must be at "
                f"least {MIN_SECRET_BYTES}. Make a random one with: python -c \"import secrets; "
                "print(secrets.token_urlsafe(32))\" (and give the same to the workers)")
        if self.redis_sentinels and not self.redis_sentinel_master:
            raise ConfigurationError(
                "PYWORKER_REDIS_SENTINELS is set but PYWORKER_REDIS_SENTINEL_MASTER is not: set "
                "it to the name the sentinels monitor the master under (e.g. mymaster)")
        if missing:
            raise ConfigurationError(
                "pyworker has no Redis configured: set "
                + " and ".join(missing)
                + ", plus PYWORKER_REDIS_PASSWORD if Redis needs one; or call "
                "pyworker.connect(url=..., password=..., secret=...); or start a local "
                "cluster with `pyworker local --workers 4`"
            )


_SECRET_FIELDS = ("redis_password", "redis_sentinel_password", "secret")


def sentinel_addresses(value: str) -> list[tuple[str, int]]:
    """PYWORKER_REDIS_SENTINELS ("host:port,host:port") as (host, port) pairs."""
    out = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigurationError(
                f"PYWORKER_REDIS_SENTINELS={value!r}: {part!r} is not host:port; expected "
                "e.g. sentinel-0:26379,sentinel-1:26379")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ConfigurationError("PYWORKER_REDIS_SENTINELS is empty; expected host:port,...")
    return out


def url_without_password(url: str) -> str:
    """The URL with its password, if it has one, replaced by *** (also in a URL that does not
    parse: its error message shows it)."""
    return re.sub(r"^([A-Za-z][\w+.-]*://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _parse(name: str, typ, raw: str):
    typ = str(typ)
    try:
        if "bool" in typ:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if "float" in typ:
            return float(raw)
        if "int" in typ:
            return int(raw)
    except ValueError as exc:
        raise ConfigurationError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not valid: {exc}"
        ) from None
    return raw


def _url_from_service_env(env) -> str | None:
    """Inside Kubernetes: PYWORKER_REDIS_SERVICE names the Redis Service whose
    <NAME>_SERVICE_HOST/_PORT variables the kubelet sets; a Service literally named
    pyworker-redis works with no variable at all."""
    service = env.get("PYWORKER_REDIS_SERVICE", "pyworker-redis")
    var = service.upper().replace("-", "_")
    host = env.get(f"{var}_SERVICE_HOST")
    if not host:
        return None
    port = env.get(f"{var}_SERVICE_PORT", "6379")
    if ":" in host:
        host = f"[{host}]"
    return f"redis://{host}:{port}/0"

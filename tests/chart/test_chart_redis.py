"""The chart's Redis: its password is on no command line (a config file from the Secret, and
REDISCLI_AUTH for the probes), and it runs with a maxmemory under its memory limit and
maxmemory-policy noeviction. The rendered config and arguments are run by a real redis-server."""
import base64
import json
import re
import shutil
import socket
import subprocess
import time

import pytest

from chartlib import CHART, CI_VALUES, container, env_of, one, pod_specs

SCENARIOS = [None] + [p.name for p in CI_VALUES]
# Quotes, a backslash, spaces and a '#': what a config line must quote and escape.
NASTY = 'pw with "quotes" \\ and # of 16+'


def render(helm, values=None, *args):
    return helm.template(*(["-f", str(CHART / "ci" / values)] if values else []), *args)


def _secret_env(c):
    return {name for name, e in env_of(c).items() if "secretKeyRef" in e.get("valueFrom", {})}


def _command_lines(c):
    """Everything a container puts on a command line: command, args and exec probes."""
    lines = list(c.get("command", [])) + list(c.get("args", []))
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        lines += c.get(probe, {}).get("exec", {}).get("command", [])
    return lines


@pytest.mark.parametrize("values", SCENARIOS)
def test_no_secret_on_any_command_line(helm, values):
    """No command, argument or probe command of any container names a variable that holds a
    secret ($(VAR) is expanded by the kubelet, $VAR by the shell): a command line is readable by
    every process on the node."""
    for name, spec, _ in pod_specs(render(helm, values)):
        for c in spec["containers"]:
            secret_vars = _secret_env(c)
            for line in _command_lines(c):
                for var in secret_vars:
                    assert not re.search(r"\$\(?\{?" + var + r"\b", line), \
                        f"{name}/{c['name']} puts ${var} on a command line: {line!r}"
                assert not re.search(r"(^|\s)(-a|--pass|--requirepass|--user)(\s|$)", line), line


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_cli(port, *args, auth=None):
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin"} | ({"REDISCLI_AUTH": auth} if auth else {})
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10, env=env).stdout.strip()


def test_real_redis_runs_the_rendered_config_and_args(helm, need_fn, tmp_path):
    """redis-server started as the chart starts it (the Secret's redis.conf, then the chart's
    arguments) requires the password, even one that needs quoting, and has noeviction and the
    rendered maxmemory. The probe's redis-cli gets in with REDISCLI_AUTH alone."""
    need_fn(shutil.which("redis-server") and shutil.which("redis-cli"),
            "redis-server/redis-cli not installed: run `bash ci/setup-env.sh test`")
    values = tmp_path / "values.json"  # (--set would read the backslash as an escape)
    values.write_text(json.dumps({"redis": {"password": NASTY}}))
    docs = render(helm, None, "-f", str(values), "--set", "redis.resources.limits.memory=100Mi")
    data = one(docs, "Secret")["data"]
    conf = tmp_path / "redis.conf"
    conf.write_bytes(base64.b64decode(data["redis.conf"]))
    assert base64.b64decode(data["redis-password"]).decode() == NASTY
    args = container(docs, "Deployment", "-redis", "redis")["args"]
    assert args[0] == "/etc/redis-secret/redis.conf"
    port = _free_port()
    args = [str(conf)] + args[1:]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--dir") + 1] = str(tmp_path)
    proc = subprocess.Popen(["redis-server", *args, "--bind", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while "NOAUTH" not in _redis_cli(port, "ping"):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.05)
        assert _redis_cli(port, "ping", auth=NASTY) == "PONG"
        assert "NOAUTH" in _redis_cli(port, "ping", auth=NASTY[:-1])
        assert _redis_cli(port, "config", "get", "maxmemory-policy", auth=NASTY).split() == \
            ["maxmemory-policy", "noeviction"]
        assert _redis_cli(port, "config", "get", "maxmemory", auth=NASTY).split() == \
            ["maxmemory", str(int(100 * 2**20 * 0.8))]
    finally:
        proc.terminate()
        proc.wait(10)


def _maxmemory(helm, *args):
    c = container(render(helm, None, *args), "Deployment", "-redis", "redis")
    a = c["args"]
    assert a[a.index("--maxmemory-policy") + 1] == "noeviction"
    return a[a.index("--maxmemory") + 1] if "--maxmemory" in a else None


@pytest.mark.parametrize("limit, expected", [
    ("1Gi", 858993459),              # the default: 80 % of the limit
    ("512Mi", 429496729),
    ("2G", 1600000000),
    ("1.5Gi", 1288490188),
    ("300000000", 240000000),
])
def test_maxmemory_is_80_percent_of_the_memory_limit(helm, limit, expected):
    assert _maxmemory(helm, "--set-string", f"redis.resources.limits.memory={limit}") == str(expected)


def test_default_maxmemory(helm):
    assert _maxmemory(helm) == str(int(2**30 * 0.8))


def test_maxmemory_given(helm):
    assert _maxmemory(helm, "--set", "redis.maxmemory=700Mi") == str(700 * 2**20)


def test_no_memory_limit_no_maxmemory_still_noeviction(helm):
    assert _maxmemory(helm, "--set", "redis.resources.limits=null") is None


def test_maxmemory_over_the_limit_is_refused(helm):
    proc = helm.run("template", "par", str(CHART), "--set", "redis.maxmemory=1Gi")
    assert proc.returncode != 0
    assert "redis.maxmemory (1Gi) must be below redis.resources.limits.memory (1Gi)" in proc.stderr


def test_values_without_maxmemory_render(helm):
    """`helm upgrade --reuse-values` from a chart without redis.maxmemory renders with the old
    release's values, which lack it (null removes a key, like that)."""
    assert _maxmemory(helm, "--set", "redis.maxmemory=null") == str(int(2**30 * 0.8))

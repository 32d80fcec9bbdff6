"""Helpers the core tests import (`from support import ...`). Not named conftest: tests/chart
has a conftest.py too, and two modules named conftest cannot both be imported by name."""
import os
import time

import pytest

REQUIRE_ALL = os.environ.get("PYWORKER_REQUIRE_ALL") == "1"


def need(condition, reason):
    """Skip (or, under PYWORKER_REQUIRE_ALL=1, fail) unless ``condition`` holds."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required for this run but missing: {reason}", pytrace=False)
    pytest.skip(reason)


def wait_until(predicate, timeout_s, what, interval_s=0.05):
    """Poll predicate until true; fail with `what` after timeout_s. Every wait is bounded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def redis_keys(cluster, pattern):
    return sorted(k.decode() for k in cluster.client.broker.redis.call("KEYS", pattern))

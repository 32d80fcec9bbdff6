"""Shared fixtures. Tests that need a tool (helm, docker, redis-server) skip when it is missing on a
developer's machine, but fail under CI (PYWORKER_REQUIRE_ALL=1), so a missing install step in
.ci/run can never turn into a silently green run."""
import os

import pytest

REQUIRE_ALL = os.environ.get("PYWORKER_REQUIRE_ALL") == "1"


def need(condition, reason):
    """Skip (or, under PYWORKER_REQUIRE_ALL=1, fail) unless ``condition`` holds."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required for this run but missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def need_fn():
    return need

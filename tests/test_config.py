"""Settings from the environment, and the errors when they are missing or wrong."""
import pytest

import pyworker
from pyworker.client import Client
from pyworker.config import Settings
from pyworker.errors import ConfigurationError, ConnectionError


def test_settings_come_from_pyworker_variables():
    s = Settings.from_env({"PYWORKER_REDIS_URL": "redis://h:1/0", "PYWORKER_LEASE_S": "2.5",
                           "PYWORKER_MAX_RETRIES": "7", "PYWORKER_FORWARD_OUTPUT": "false"})
    assert (s.redis_url, s.lease_s, s.max_retries, s.forward_output) == (
        "redis://h:1/0", 2.5, 7, False)
    assert s.heartbeat_s <= s.lease_s / 3


def test_bad_value_names_the_variable():
    with pytest.raises(ConfigurationError, match="PYWORKER_LEASE_S='soon' is not valid"):
        Settings.from_env({"PYWORKER_LEASE_S": "soon"})


def test_kubernetes_service_variables_are_enough():
    env = {"PAR_PYWORKER_REDIS_SERVICE_HOST": "10.0.0.7", "PAR_PYWORKER_REDIS_SERVICE_PORT": "6380",
           "PYWORKER_REDIS_SERVICE": "par-pyworker-redis"}
    assert Settings.from_env(env).redis_url == "redis://10.0.0.7:6380/0"
    assert Settings.from_env({"PYWORKER_REDIS_SERVICE_HOST": "r"}).redis_url == "redis://r:6379/0"


def test_no_redis_configured_says_what_to_set():
    with pytest.raises(ConfigurationError) as info:
        pyworker.Client(Settings.from_env({}))
    text = str(info.value)
    assert "PYWORKER_REDIS_URL" in text and "PYWORKER_SECRET" in text
    assert "pyworker.connect(" in text


def test_wrong_password_is_one_clear_line(redis_server):
    with pytest.raises(ConnectionError) as info:
        pyworker.connect(url=redis_server.url, password="wrong", secret="test-secret-16-bytes")
    text = str(info.value)
    assert "refused the password" in text and "\n" not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_password_is_one_clear_line(redis_server):
    with pytest.raises(ConnectionError, match="needs a password|refused the password"):
        pyworker.connect(url=redis_server.url, password="", secret="test-secret-16-bytes")


def test_unreachable_redis_is_one_clear_line(redis_server):
    from pyworker.local import free_port
    with pytest.raises(ConnectionError, match=r"cannot reach Redis at 127.0.0.1:\d+: .*refused"):
        pyworker.connect(url=f"redis://127.0.0.1:{free_port()}/0", password="p", secret="test-secret-16-bytes")


def test_not_a_redis_url():
    with pytest.raises(ConnectionError, match="is not a Redis URL"):
        pyworker.connect(url="http://example.invalid/", password="p", secret="test-secret-16-bytes")


def test_connect_makes_the_default_client(redis_server):
    from pyworker import api
    before = api._default
    try:
        client = pyworker.connect(url=redis_server.url, password=redis_server.password,
                                  secret="test-secret-16-bytes")
        assert pyworker.get_client() is client
        assert pyworker.status().alive == []
    finally:
        api._set_default(before)


def test_out_of_range_values_are_refused_with_the_variable_name():
    with pytest.raises(ConfigurationError, match="PYWORKER_LEASE_S must be greater than 0"):
        Settings.from_env({"PYWORKER_LEASE_S": "0"})
    with pytest.raises(ConfigurationError, match="PYWORKER_MAX_RETRIES must be 0 or more"):
        Settings.from_env({"PYWORKER_MAX_RETRIES": "-1"})


def test_shared_memory_can_be_turned_off_and_moved():
    s = Settings.from_env({"PYWORKER_SHARED_MEMORY": "false", "PYWORKER_SHM_DIR": "/run/x"})
    assert (s.shared_memory, s.shm_dir) == (False, "/run/x")
    assert Settings.from_env({}).shared_memory is True
    assert Settings.from_env({}).shm_dir == "/dev/shm"


def test_every_setting_is_documented_in_the_readme():
    import dataclasses
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    undocumented = [f"PYWORKER_{f.name.upper()}" for f in dataclasses.fields(Settings)
                    if f"`PYWORKER_{f.name.upper()}`" not in readme]
    assert not undocumented, f"add to README's settings table: {undocumented}"


def test_spin_is_a_short_time_and_can_be_turned_off():
    assert Settings.from_env({}).spin_s == 0.002
    assert Settings.from_env({"PYWORKER_SPIN_S": "0"}).spin_s == 0
    with pytest.raises(ConfigurationError, match="PYWORKER_SPIN_S must be 0"):
        Settings.from_env({"PYWORKER_SPIN_S": "-1"})


def test_settings_repr_never_shows_the_secret_or_the_password():
    settings = Settings(redis_url="redis://bob:hunter2-in-url@h:6379/0",
                        redis_password="hunter2-password", secret="hunter2-secret-key")
    for text in (repr(settings), str(settings), f"{settings}"):
        assert "hunter2" not in text, text
        assert "redis://bob:***@h:6379/0" in text and "secret='<set>'" in text, text
    assert "secret=None" in repr(Settings(redis_url="redis://h:6379/0"))
    assert "redis://:***@h:port/0" in repr(Settings(redis_url="redis://:hunter2@h:port/0"))


def test_a_malformed_url_is_named_without_its_password():
    with pytest.raises(ConnectionError, match="is not a Redis URL") as info:
        pyworker.connect(url="redis://:hunter2@127.0.0.1:notaport/0", secret="test-secret-16-bytes")
    assert "hunter2" not in str(info.value) and "redis://:***@127.0.0.1:notaport/0" in str(info.value)


def test_a_short_secret_is_refused_with_a_way_to_make_one(redis_server):
    with pytest.raises(ConfigurationError, match="PYWORKER_SECRET is 5 byte.* at least 16") as info:
        pyworker.connect(url=redis_server.url, password=redis_server.password, secret="short")
    assert "secrets.token_urlsafe" in str(info.value) and "short" not in str(info.value)
    # (a Client of its own: connect() would make it the default of the tests that follow)
    client = Client(Settings(redis_url=redis_server.url, redis_password=redis_server.password,
                             secret="x" * 16))
    assert client.ping() is client
    client.close()

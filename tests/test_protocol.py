"""Message headers: what each side reads, and what it tolerates from other versions."""
import pytest

from pyworker import protocol


def test_a_task_header_round_trips_and_ignores_appended_fields():
    line = protocol.task_header("j1", 3, "f" * 32, "3.11", "3.1.1", ref=True, shm="x.y.1")
    h = protocol.parse_task_header(line)
    assert (h.jid, h.chunk, h.fn_sha, h.python, h.cloudpickle, h.ref, h.shared, h.shm) == \
        ("j1", 3, "f" * 32, "3.11", "3.1.1", True, False, "x.y.1")
    assert protocol.parse_task_header(line[:-1] + b" later more\n") == h


@pytest.mark.parametrize("line", [b"j1 3 sha 3.11 3.1.1\n", b"j1 3 sha 3.11 3.1.1 q -\n"])
def test_a_task_header_it_cannot_read_still_names_its_job_and_chunk(line):
    with pytest.raises(ValueError):
        protocol.parse_task_header(line)
    assert protocol.task_ids(line) == ("j1", 3)
    assert protocol.task_ids(b"garbage\n") is None


def test_a_task_header_carries_its_time_limit_and_alive_time():
    h = protocol.parse_task_header(protocol.task_header("j1", 3, "s", "3.11", "3.1.1",
                                                        timeout=2.5, alive=1700000000))
    assert (h.timeout, h.alive) == (2.5, 1700000000)
    h = protocol.parse_task_header(b"j1 3 s 3.11 3.1.1 i -\n")  # a caller from before: ask Redis
    assert (h.timeout, h.alive) == (0.0, 0)


def test_a_lost_marker_names_job_chunk_and_a_safe_worker_name():
    assert protocol.lost_marker(b"j1 4 !lost w-1 3\n") == ("j1", 4, "w-1", 3)
    assert protocol.lost_marker(b"j1 4 !lost <b>evil</b> 3\n") == ("j1", 4, "?", 3)
    assert protocol.lost_marker(b"j1 4 s 3.11 3.1.1 i - 0 0\n") is None


def test_a_result_header_ignores_fields_appended_after_the_flag():
    h = protocol.parse_result_header(b"4 ok w-1 r later fields\n")
    assert (h.chunk, h.status, h.worker, h.ref, h.shared) == (4, "ok", "w-1", True, False)
    lost = protocol.parse_result_header(b"4 lost w-1 3 deaths\n")
    assert lost.detail == "3 deaths", "a reason for people keeps every word"

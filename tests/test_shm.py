"""Big payloads through shared memory on one host: the segments themselves (a private folder,
verified before unpickling, orphans swept), then pmap with real workers: used when caller and
workers share the folder, Redis otherwise, and no file left behind."""
import os
import pickle
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

import pyworker
from pyworker import protocol, serialize, shm
from pyworker.config import Settings
from pyworker.errors import SignatureError

from support import redis_bytes_in, shm_cluster, shm_files, wait_until

MiB = 2**20


def _segment(store, obj, jid="job0123456789", chunk=0, kind=shm.TASK):
    buffers = []
    stream = serialize.dumps_data(obj, buffers)
    return store.write(jid, chunk, kind, f"{store.pidns}.{os.getpid()}", stream, buffers)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- the segments --------------------------------------------------------------------------------


def test_segment_round_trip_arrays_out_of_band_writable_and_private(tmp_path):
    store = shm.Store(str(tmp_path))
    arrays = [np.arange(MiB // 8, dtype=np.float64) * i for i in range(3)]
    desc = _segment(store, (1, arrays, "small"))
    assert len(desc.lengths) == 3, "each array travelled out of band, not inside the pickle"
    assert desc.stream_len < 4096
    st = os.stat(os.path.join(store.dir, desc.name))
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.dir).st_mode) == 0o700
    assert st.st_size == shm.layout(desc.stream_len, desc.lengths)[1]
    stream, buffers = store.read(shm.Descriptor.parse(desc.encode()), 64 * MiB)
    mode, got, text = pickle.loads(stream, buffers=buffers)
    assert mode == 1 and text == "small"
    for a, b in zip(arrays, got):
        assert np.array_equal(a, b)
    got[0][0] = 42.0  # writable, and private: the file does not change
    stream, buffers = store.read(desc, 64 * MiB)
    again = pickle.loads(stream, buffers=buffers)
    assert again[1][0][0] == 0.0


def test_tampered_segment_is_refused_before_anything_is_unpickled(tmp_path):
    store = shm.Store(str(tmp_path))
    canary = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    desc = _segment(store, [np.zeros(MiB // 8)])
    evil = pickle.dumps(Evil(), protocol=5)
    assert len(evil) <= desc.stream_len
    with open(os.path.join(store.dir, desc.name), "r+b") as f:  # same size, other bytes
        f.write(evil + b"\0" * (desc.stream_len - len(evil)))
    with pytest.raises(shm.SegmentTampered, match="does not match the hash"):
        store.read(desc, 64 * MiB)
    assert not canary.exists()
    with open(os.path.join(store.dir, desc.name), "ab") as f:
        f.write(b"x")
    with pytest.raises(shm.SegmentTampered, match="bytes, its signed descriptor says"):
        store.read(desc, 64 * MiB)


def test_a_folder_that_is_not_private_turns_shared_memory_off(tmp_path, caplog):
    base = tmp_path / "base"
    folder = base / f"pyworker-{os.geteuid()}"
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    settings = Settings(shm_dir=str(base))
    assert shm.Store.open(settings) is None
    assert "not private to this user" in caplog.text
    folder.chmod(0o700)
    assert shm.Store.open(settings) is not None
    assert shm.Store.open(Settings(shm_dir=str(base), shared_memory=False)) is None
    if os.geteuid() == 0:  # someone else's folder (only root can make one here)
        os.chown(folder, 12345, 12345)
        assert shm.Store.open(settings) is None


def test_sweep_removes_orphans_and_nothing_else(tmp_path):
    store = shm.Store(str(tmp_path))
    me = f"{store.pidns}.{os.getpid()}"
    dead = f"{store.pidns}.{_dead_pid()}"
    names = {
        "dead_owner": f"aaaa.0.t.{dead}.00000000",
        "dead_owner_result": f"aaaa.1.r.{dead}.00000001",
        "live_owner": f"bbbb.0.t.{store.pidns}.{os.getppid()}.00000002",
        "mine_live_job": f"cccc.0.t.{me}.00000003",
        "mine_ended_job": f"dddd.0.r.{me}.00000004",
        "other_pid_namespace": f"eeee.0.t.1.{_dead_pid()}.00000005",
        "not_a_segment": "notes.txt",
    }
    for name in names.values():
        open(os.path.join(store.dir, name), "w").close()
    shm.job_started("cccc")
    try:
        assert store.sweep() == 3
    finally:
        shm.job_ended("cccc")
    assert set(os.listdir(store.dir)) == {names[k] for k in (
        "live_owner", "mine_live_job", "other_pid_namespace", "not_a_segment")}


def test_identity_is_the_same_folder_on_the_same_boot(tmp_path):
    a, b = shm.Store(str(tmp_path)), shm.Store(str(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    other = shm.Store(str(tmp_path / "elsewhere"))
    assert a.ident == b.ident != other.ident
    assert shm.Store.parse_tag(a.tag()) == (a.ident, f"{a.pidns}.{os.getpid()}")
    assert shm.Store.parse_tag("-") is None


# --- pmap through shared memory ------------------------------------------------------------------


def _plus_one_fn():
    return lambda a: a + 1  # by value: the workers cannot import this test module


def test_big_arrays_round_trip_through_shared_memory_not_redis(make_cluster, tmp_path):
    cluster, client = shm_cluster(make_cluster, tmp_path)
    arrays = [np.full(MiB // 8, i, dtype=np.float64) for i in range(12)]  # 1 MiB each
    before = redis_bytes_in(cluster)
    out = pyworker.pmap(_plus_one_fn(), arrays, client=client)
    crossed = redis_bytes_in(cluster) - before
    assert [float(o[0]) for o in out] == [i + 1.0 for i in range(12)]
    assert all(o.shape == (MiB // 8,) and o.flags.writeable for o in out)
    assert crossed < 200_000, f"{crossed} bytes crossed Redis for 24 MiB of arrays"
    assert shm_files(tmp_path) == [], "a segment outlived its job"
    # small payloads keep travelling inline
    assert pyworker.pmap(abs, [-1, -2], client=client) == [1, 2]


def test_small_inputs_with_big_results_come_back_through_shared_memory(make_cluster, tmp_path):
    cluster, client = shm_cluster(make_cluster, tmp_path, n=1)
    before = redis_bytes_in(cluster)
    out = pyworker.pmap(lambda n: np.ones(n), [MiB // 8] * 4, client=client)
    assert redis_bytes_in(cluster) - before < 100_000
    assert [float(o.sum()) for o in out] == [MiB / 8] * 4
    assert shm_files(tmp_path) == []


def test_redis_carries_big_payloads_when_shared_memory_is_off(make_cluster, tmp_path):
    cluster, client = shm_cluster(make_cluster, tmp_path,
                                  worker_env={"PYWORKER_SHARED_MEMORY": "false"})
    arrays = [np.full(MiB // 8, i, dtype=np.float64) for i in range(4)]
    before = redis_bytes_in(cluster)
    out = pyworker.pmap(_plus_one_fn(), arrays, client=client)
    assert [float(o[0]) for o in out] == [1.0, 2.0, 3.0, 4.0]
    assert redis_bytes_in(cluster) - before > 8 * MiB, "both ways through Redis"
    assert shm_files(tmp_path) == []


def test_workers_that_do_not_share_the_folder_get_everything_through_redis(make_cluster,
                                                                            tmp_path):
    # Like a caller and workers in different pods: the workers see another folder.
    cluster, client = shm_cluster(make_cluster, tmp_path / "workers",
                                  client_dir=tmp_path / "caller")
    arrays = [np.full(MiB // 8, i, dtype=np.float64) for i in range(4)]
    before = redis_bytes_in(cluster)
    out = pyworker.pmap(_plus_one_fn(), arrays, client=client)
    assert [float(o[0]) for o in out] == [1.0, 2.0, 3.0, 4.0]
    assert redis_bytes_in(cluster) - before > 8 * MiB
    assert shm_files(tmp_path / "caller") == [] and shm_files(tmp_path / "workers") == []


def test_a_worker_that_cannot_read_a_segment_gets_the_chunk_again_through_redis(
        make_cluster, tmp_path, monkeypatch):
    # The caller believes its workers share its folder (e.g. a worker from another host joined
    # after it looked): they answer 'resend' and the chunks come again through Redis.
    cluster, client = shm_cluster(make_cluster, tmp_path / "workers",
                                  client_dir=tmp_path / "caller")
    monkeypatch.setattr(client, "workers_share_memory", lambda: True)
    arrays = [np.full(MiB // 8, i, dtype=np.float64) for i in range(4)]
    out = pyworker.pmap(_plus_one_fn(), arrays, client=client, timeout=60)
    assert [float(o[0]) for o in out] == [1.0, 2.0, 3.0, 4.0]
    assert shm_files(tmp_path / "caller") == []


def _blocked_until(release):
    """Items are a release-file path (wait for it) or an array (sum it)."""

    def task(x):
        import os
        import time
        if isinstance(x, str):
            deadline = time.monotonic() + 60
            while not os.path.exists(x) and time.monotonic() < deadline:
                time.sleep(0.01)
            return 0.0
        return float(x.sum())

    return task


def test_a_tampered_segment_is_rejected_by_the_worker_without_unpickling(make_cluster, tmp_path):
    folder = tmp_path / "shm"
    cluster, client = shm_cluster(make_cluster, folder, n=1)
    canary, release = tmp_path / "unpickled", tmp_path / "release"

    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    box = {}

    def run():
        try:
            box["result"] = pyworker.pmap(_blocked_until(str(release)),
                                          [str(release), np.ones(MiB // 8)], chunksize=1,
                                          client=client, timeout=60)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    name = wait_until(lambda: [n for n in shm_files(folder) if ".1.t." in n], 20,
                      "the array's segment")[0]
    path = os.path.join(folder, f"pyworker-{os.geteuid()}", name)
    # Written in full first: the caller creates the file, then writes it from its start, and
    # would overwrite a change made before that (the test failed so, once in many runs).
    wait_until(lambda: os.path.getsize(path) >= MiB, 20, "the array's segment to be written")
    evil = pickle.dumps(Evil(), protocol=5)
    with open(path, "r+b") as f:  # the worker is still busy with item 0
        f.write(evil)
    release.touch()
    t.join(60)
    assert isinstance(box.get("error"), SignatureError), box
    assert "shared memory" in str(box["error"]) and "does not match the hash" in str(box["error"])
    assert not canary.exists(), "the worker unpickled a tampered segment"
    assert shm_files(folder) == []


def test_segments_of_a_dead_caller_are_swept_when_a_worker_starts(make_cluster, tmp_path):
    store = shm.Store(str(tmp_path))
    dead = f"{store.pidns}.{_dead_pid()}"
    orphan = os.path.join(store.dir, f"0123456789abcdef0123.0.t.{dead}.0badf00d")
    with open(orphan, "wb") as f:
        f.write(b"x" * 1000)
    shm_cluster(make_cluster, tmp_path, n=1)  # started: its worker has registered
    assert not os.path.exists(orphan)


def test_segments_of_a_dead_caller_are_swept_when_a_job_starts(make_cluster, tmp_path):
    cluster, client = shm_cluster(make_cluster, tmp_path, n=1)
    store = client.shm
    orphan = os.path.join(store.dir, f"0123456789abcdef0123.3.r.{store.pidns}.{_dead_pid()}."
                                     "0badf00d")
    open(orphan, "wb").close()
    client._last_sweep = None  # as for a client's first job
    assert pyworker.pmap(abs, [-3], client=client) == [3]
    assert not os.path.exists(orphan)


def test_task_headers_from_callers_without_shared_memory_still_parse():
    h = protocol.parse_task_header(b"j 7 s 3.11 3.1.0 i")
    assert (h.shared, h.shm) == (False, protocol.NO_SHM)
    line = protocol.task_header("j", 7, "s", "3.11", "3.1.0", where=protocol.SHARED,
                                shm="0123456789abcdef.4026531836.42")
    h = protocol.parse_task_header(line[:-1])
    assert h.shared and not h.ref and h.shm == "0123456789abcdef.4026531836.42"

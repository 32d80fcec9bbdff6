"""Signing and pickling, no Redis needed."""
import pickle

import pytest

from pyworker import protocol, serialize
from pyworker.errors import SerializationError, SignatureError


TASK = protocol.mac_context(protocol.KIND_TASK)


def test_sealed_message_opens_with_the_same_secret_only():
    header = protocol.task_header("job1", 3, "f" * 32, "3.11", "3.1.0")
    sealed = serialize.Signer("k1").seal(TASK, header, b"payload")
    got_header, payload = serialize.Signer("k1").open(TASK, sealed)
    assert got_header == header and bytes(payload) == b"payload"
    with pytest.raises(SignatureError):
        serialize.Signer("k2").open(TASK, sealed)


@pytest.mark.parametrize("where", ["header", "payload"])
def test_any_tampered_byte_breaks_the_signature(where):
    header = protocol.task_header("job1", 3, "f" * 32, "3.11", "3.1.0")
    sealed = bytearray(serialize.Signer("k").seal(TASK, header, b"payload"))
    pos = 2 if where == "header" else len(sealed) - 1
    sealed[pos] ^= 1
    with pytest.raises(SignatureError):
        serialize.Signer("k").open(TASK, bytes(sealed))


def test_a_signature_is_bound_to_its_kind_and_job():
    signer = serialize.Signer("k")
    header = protocol.result_header(3, protocol.STATUS_OK, "w-1", protocol.INLINE)
    ctx = protocol.mac_context(protocol.KIND_RESULT, "job1")
    sealed = signer.seal(ctx, header, b"payload")
    assert bytes(signer.open(ctx, sealed)[1]) == b"payload"
    for other in (protocol.mac_context(protocol.KIND_RESULT, "job2"),  # another job's result
                  protocol.mac_context(protocol.KIND_OUTPUT, "job1"),  # another kind
                  TASK):
        with pytest.raises(SignatureError):
            signer.open(other, sealed)


def test_a_function_blob_must_be_the_function_its_name_says():
    signer = serialize.Signer("k")
    one, two = serialize.dumps_function(abs), serialize.dumps_function(len)
    blob = signer.seal_blob(one)
    assert bytes(signer.open_blob(blob, serialize.function_sha(one))) == one
    with pytest.raises(SignatureError, match="is another function"):
        signer.open_blob(blob, serialize.function_sha(two))
    with pytest.raises(SignatureError, match="signature does not match"):
        serialize.Signer("k2").open_blob(blob, serialize.function_sha(one))


def test_alive_records_are_bound_to_their_job_and_time():
    signer = serialize.Signer("k")
    mac = signer.alive_mac("job1", 1000)
    assert mac == signer.alive_mac("job1", 1000)
    assert mac != signer.alive_mac("job2", 1000) and mac != signer.alive_mac("job1", 1001)
    assert protocol.parse_alive_record(protocol.alive_record(1000, mac)) == (1000, mac)
    assert protocol.parse_alive_record(b"garbage") is None


@pytest.mark.parametrize("secret", ["k", "x" * 64, "y" * 65, "é" * 200])
def test_signatures_are_standard_hmac_sha256(secret):
    # other implementations (a worker in another language, an audit script) must agree
    import hashlib
    import hmac
    signer = serialize.Signer(secret)
    for parts in [(b"",), (b"head\n", b"payload"), (b"a" * 1000, memoryview(b"b" * 70000))]:
        expected = hmac.new(secret.encode(), b"".join(bytes(p) for p in parts),
                            hashlib.sha256).digest()
        assert signer.sign(*parts) == expected
        assert signer.sign(*parts) == expected  # the key's precomputed state is not consumed


def test_empty_secret_is_refused():
    with pytest.raises(ValueError):
        serialize.Signer("")


def test_lambdas_and_closures_pickle_by_value():
    k = 5
    fn = lambda x: x + k  # noqa: E731
    blob = serialize.dumps_function(fn)
    assert pickle.loads(blob)(1) == 6
    # The same function is the same blob, so repeated jobs share one copy in Redis.
    assert serialize.function_sha(blob) == serialize.function_sha(serialize.dumps_function(fn))


def test_chunk_errors_name_the_item():
    with pytest.raises(SerializationError, match=r"item #12 .*generator"):
        serialize.dumps_chunk(protocol.MODE_ONE, [1, (x for x in [])], 11, 2**20)


def test_headers_round_trip():
    h = protocol.parse_task_header(protocol.task_header("j", 7, "s", "3.11", "3.1.0")[:-1])
    assert (h.jid, h.chunk, h.fn_sha, h.python, h.cloudpickle) == ("j", 7, "s", "3.11", "3.1.0")
    r = protocol.parse_result_header(
        protocol.result_header(4, "rejected", "w-1", "bad\nsig here")[:-1])
    assert (r.chunk, r.status, r.worker, r.detail) == (4, "rejected", "w-1", "bad sig here")


def test_names_with_spaces_or_colons_are_refused():
    with pytest.raises(ValueError, match="invalid worker name"):
        protocol.check_name("worker name", "a b")
    assert protocol.check_name("worker name", "par-pyworker-worker-5d8f9-abcde") 


def test_big_buffers_go_out_of_band_small_ones_stay_in_the_stream():
    import numpy as np
    big, small = np.arange(2**14, dtype=np.float64), np.arange(10)
    buffers = []
    stream = serialize.dumps_data((big, small, big[::2]), buffers)  # a view: not contiguous
    assert [b.nbytes for b in buffers] == [big.nbytes]
    assert len(stream) < big.nbytes // 2 + 2000
    got = serialize.loads(stream, buffers)
    assert np.array_equal(got[0], big) and np.array_equal(got[1], small)
    assert np.array_equal(got[2], big[::2])
    assert serialize.payload_size(stream, buffers) == len(stream) + big.nbytes
    assert serialize.loads(serialize.dumps_data((big, small)))[0][-1] == big[-1]  # in-band


def test_only_importable_functions_count_as_pickled_by_reference():
    import os.path
    assert serialize.pickled_by_reference(os.path.basename)
    assert not serialize.pickled_by_reference(lambda x: x)
    offset = 3
    assert not serialize.pickled_by_reference(lambda x: x + offset)

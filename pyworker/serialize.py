"""Pickling (cloudpickle only where plain pickle cannot), size limits and HMAC-SHA256 signing."""
from __future__ import annotations

import hashlib
import hmac
import pickle
import sys
import traceback

import cloudpickle

from . import protocol
from .errors import RemoteError, RemoteTraceback, SerializationError, SignatureError

PYTHON_VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"
CLOUDPICKLE_VERSION = cloudpickle.__version__
PROTOCOL = 5


class Signer:
    def __init__(self, secret: str | bytes):
        if isinstance(secret, str):
            secret = secret.encode()
        if not secret:
            raise ValueError("an empty secret cannot sign messages")
        self._key = secret

    def sign(self, *parts) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.digest()

    def seal(self, header: bytes, payload: bytes, inline: bool = True) -> bytes:
        """header + signature (+ payload when it travels inline)."""
        sig = self.sign(header, payload)
        return b"".join((header, sig, payload)) if inline else header + sig

    def open(self, data, payload=None) -> tuple[bytes, memoryview]:
        """Header and verified payload of a sealed message (payload given separately when it
        did not travel inline); SignatureError before anything is unpickled."""
        header = protocol.header_line(data)
        view = memoryview(data)[len(header):]
        if len(view) < protocol.SIG_BYTES:
            raise SignatureError("message too short to carry a signature")
        sig = view[: protocol.SIG_BYTES]
        payload = view[protocol.SIG_BYTES:] if payload is None else memoryview(payload)
        if not hmac.compare_digest(bytes(sig), self.sign(header, payload)):
            raise SignatureError("signature does not match (wrong PYWORKER_SECRET?)")
        return header, payload

    def seal_blob(self, payload: bytes) -> bytes:
        return self.sign(payload) + payload

    def open_blob(self, data) -> memoryview:
        view = memoryview(data)
        sig, payload = view[: protocol.SIG_BYTES], view[protocol.SIG_BYTES:]
        if not hmac.compare_digest(bytes(sig), self.sign(payload)):
            raise SignatureError("function signature does not match (wrong PYWORKER_SECRET?)")
        return payload


def _describe(obj) -> str:
    try:
        text = repr(obj)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= 120 else text[:117] + "..."


def dumps_function(fn) -> bytes:
    try:
        return cloudpickle.dumps(fn, protocol=PROTOCOL)
    except Exception as exc:
        name = getattr(fn, "__qualname__", None) or _describe(fn)
        raise SerializationError(
            f"cannot send function {name} to the workers: {type(exc).__name__}: {exc}. "
            "Everything the function uses (globals, closure variables) must be picklable; "
            "create such objects (open files, locks, connections) inside the function instead."
        ) from exc


def function_sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:32]


def dumps_data(obj) -> bytes:
    try:
        return pickle.dumps(obj, protocol=PROTOCOL)
    except Exception:
        return cloudpickle.dumps(obj, protocol=PROTOCOL)


def dumps_chunk(mode: int, items: list, first_index: int, limit_bytes: int) -> bytes:
    """Pickle a chunk of items; name the item that cannot be pickled or is too large."""
    try:
        data = dumps_data((mode, items))
    except Exception:
        data = None
    if data is not None and len(data) <= limit_bytes:
        return data
    for offset, item in enumerate(items):
        index = first_index + offset
        try:
            size = len(dumps_data(item))
        except Exception as exc:
            raise SerializationError(
                f"item #{index} ({_describe(item)}) cannot be sent to the workers: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if size > limit_bytes:
            raise SerializationError(
                f"item #{index} ({_describe(item)}) is {size / 2**20:.1f} MiB pickled, over the "
                f"limit of {limit_bytes / 2**20:.0f} MiB; raise PYWORKER_MAX_MESSAGE_MB or pass "
                "smaller items (e.g. file paths instead of the data)"
            )
    raise SerializationError(
        f"the chunk starting at item #{first_index} is {len(data) / 2**20:.1f} MiB pickled, over "
        f"the limit of {limit_bytes / 2**20:.0f} MiB; pass a smaller chunksize"
    )


def loads(data):
    return pickle.loads(data)


# --- exceptions across the wire -----------------------------------------------------------------


def pack_exception(exc: BaseException) -> tuple:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = cloudpickle.dumps(exc, protocol=PROTOCOL)
        pickle.loads(blob)  # an exception that pickles but cannot be rebuilt is sent as text
    except Exception:
        blob = None
    return (blob, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), tb)


def unpack_exception(packed: tuple, where: str, index=None, item=None, worker=None):
    """The original exception with the remote traceback as __cause__, or a RemoteError."""
    blob, type_name, message, tb = packed
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
            if hasattr(exc, "add_note"):
                exc.add_note(f"pyworker: raised by {where} on worker {worker}")
            try:
                exc.pyworker_index = index
            except Exception:
                pass
            return exc
    return RemoteError(type_name, message, tb, index=index, item=item, worker=worker)

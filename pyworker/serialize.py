"""Pickling (cloudpickle only where plain pickle cannot), size limits and HMAC-SHA256 signing."""
from __future__ import annotations

import hashlib
import hmac
import pickle
import sys
import threading
import traceback
import warnings

import cloudpickle

from . import protocol
from .errors import RemoteError, RemoteTraceback, SerializationError, SignatureError

PYTHON_VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"
CLOUDPICKLE_VERSION = cloudpickle.__version__
PROTOCOL = 5


class Signer:
    """HMAC-SHA256 (RFC 2104) with the key's inner and outer hash states computed once: a
    message then costs two hash copies, about 2 µs instead of 5 for hmac.new."""

    def __init__(self, secret: str | bytes):
        if isinstance(secret, str):
            secret = secret.encode()
        if not secret:
            raise ValueError("an empty secret cannot sign messages")
        key = secret
        block = hashlib.sha256().block_size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(k ^ 0x36 for k in key))
        self._outer = hashlib.sha256(bytes(k ^ 0x5C for k in key))

    def sign(self, *parts) -> bytes:
        inner = self._inner.copy()
        for part in parts:
            inner.update(part)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def seal(self, context: bytes, header: bytes, payload: bytes = b"",
             inline: bool = True) -> bytes:
        """header + signature (+ payload when it travels inline). ``context`` is
        protocol.mac_context(kind, jid): signed, not sent."""
        sig = self.sign(context, header, payload)
        return b"".join((header, sig, payload)) if inline else header + sig

    def open(self, context: bytes, data, payload=None, header=None) -> tuple[bytes, memoryview]:
        """Header and verified payload of a sealed message (payload given separately when it
        did not travel inline; header when the caller has read it already); SignatureError
        before anything is unpickled. ``context`` as given to seal()."""
        if header is None:
            header = protocol.header_line(data)
        view = memoryview(data)[len(header):]
        if len(view) < protocol.SIG_BYTES:
            raise SignatureError("message too short to carry a signature")
        sig = view[: protocol.SIG_BYTES]
        payload = view[protocol.SIG_BYTES:] if payload is None else memoryview(payload)
        if not hmac.compare_digest(bytes(sig), self.sign(context, header, payload)):
            raise SignatureError("signature does not match (wrong PYWORKER_SECRET?)")
        return header, payload

    def seal_blob(self, payload: bytes) -> bytes:
        return self.sign(protocol.mac_context(protocol.KIND_FN), payload) + payload

    def open_blob(self, data, sha: str) -> memoryview:
        """The verified payload of a function blob stored as P:fn:<sha>: its signature, then
        that it is the function the sha names (a signed blob of another function under this
        name is refused)."""
        view = memoryview(data)
        sig, payload = view[: protocol.SIG_BYTES], view[protocol.SIG_BYTES:]
        if not hmac.compare_digest(bytes(sig),
                                   self.sign(protocol.mac_context(protocol.KIND_FN), payload)):
            raise SignatureError("function signature does not match (wrong PYWORKER_SECRET?)")
        if function_sha(payload) != sha:
            raise SignatureError(f"the function stored as {sha} is another function (its sha "
                                 f"is {function_sha(payload)})")
        return payload

    def alive_mac(self, jid: str, until: int) -> str:
        return self.sign(protocol.mac_context(protocol.KIND_ALIVE, jid), str(until).encode()).hex()


def _describe(obj) -> str:
    try:
        text = repr(obj)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= 120 else text[:117] + "..."


# cloudpickle's registry of modules pickled by value is global: one function's modules are
# registered only while it is pickled, one function at a time.
_by_value_lock = threading.Lock()


def dumps_function(fn, by_value=()) -> bytes:
    """cloudpickle(fn); the modules named in ``by_value`` (top-level names, imported here:
    ship.modules_to_ship) go inside it, by value, for workers that cannot import them. If they
    cannot be pickled (a module-level lock, say), fn is pickled as before, with a warning:
    workers that have the modules still run it."""
    shipping_failed = None
    if by_value:
        try:
            return _dumps_shipping(fn, by_value)
        except Exception as exc:
            shipping_failed = exc
    try:
        data = cloudpickle.dumps(fn, protocol=PROTOCOL)
    except Exception as exc:
        name = getattr(fn, "__qualname__", None) or _describe(fn)
        raise SerializationError(
            f"cannot send function {name} to the workers: {type(exc).__name__}: {exc}. "
            "Everything the function uses (globals, closure variables) must be picklable; "
            "create such objects (open files, locks, connections) inside the function instead."
        ) from exc
    if shipping_failed is not None:
        warnings.warn(
            f"pyworker: cannot send module(s) {', '.join(by_value)} with the function "
            f"({type(shipping_failed).__name__}: {shipping_failed}); the workers must import "
            "them themselves. Create what cannot be pickled inside a function instead of at "
            "module level, or set PYWORKER_SHIP_MODULES=false to silence this",
            RuntimeWarning, stacklevel=4)
    return data


def _dumps_shipping(fn, by_value) -> bytes:
    with _by_value_lock:
        already = set(cloudpickle.list_registry_pickle_by_value())
        added = []
        try:
            for name in by_value:
                if name not in already:
                    cloudpickle.register_pickle_by_value(sys.modules[name])
                    added.append(name)
            return cloudpickle.dumps(fn, protocol=PROTOCOL)
        finally:
            for name in added:
                cloudpickle.unregister_pickle_by_value(sys.modules[name])


def loads_function(data):
    """The function a blob holds; a module it needs that this worker cannot import is named,
    with what to do about it."""
    try:
        return pickle.loads(data)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"{exc} on this worker, and the function needs it. If it is your own "
            "module (a .py file next to the notebook or on a path you added), let the caller "
            "ship it with the function: unset PYWORKER_SHIP_MODULES or set it to true there. "
            "If it is an installed package, install it on the workers too",
            name=exc.name, path=exc.path) from exc


def pickled_by_reference(fn) -> bool:
    """Whether cloudpickle pickles fn as a reference (module and name: an importable function)
    rather than by value (lambdas, closures, __main__ and notebook functions)."""
    check = getattr(getattr(cloudpickle, "cloudpickle", None), "_should_pickle_by_reference",
                    None)
    if check is None or not callable(fn):
        return False
    try:
        return bool(check(fn)) and getattr(fn, "__closure__", None) is None
    except Exception:
        return False


def function_sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:32]


OOB_MIN_BYTES = 64 * 1024  # smaller buffers stay in the pickle stream
OOB_MAX_BUFFERS = 1024  # beyond this, buffers stay in-band (keeps a segment's descriptor small)


def _collector(buffers: list):
    """A pickle buffer_callback that keeps big contiguous buffers (numpy arrays: what pickles
    as a PickleBuffer) out of band, in ``buffers``, as raw memoryviews; small ones stay in the
    stream."""

    def callback(buf: pickle.PickleBuffer):
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: in-band
            return True
        if raw.nbytes < OOB_MIN_BYTES or len(buffers) >= OOB_MAX_BUFFERS:
            return True
        buffers.append(raw)
        return False

    return callback


def dumps_data(obj, buffers: list | None = None) -> bytes:
    """Pickle protocol 5; with a ``buffers`` list, big buffers go there (out of band) and the
    stream must be loaded with loads(stream, buffers)."""
    callback = None if buffers is None else _collector(buffers)
    try:
        return pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=callback)
    except Exception:
        if buffers:
            del buffers[:]
        return cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=callback)


def payload_size(stream, buffers) -> int:
    return len(stream) + sum(b.nbytes for b in buffers or ())


def _zipped(columns) -> list:
    return list(zip(*columns))


class Zipped:
    """Several sequences' items side by side, as zip() pairs them: how a chunk of
    pmap(fn, xs, ys) over lists, tuples, ranges or arrays travels, a slice of each (a range
    stays a range, an array one buffer) rather than a tuple per item. Unpickled, it is the
    list of those tuples (zipped at C speed, indexed at C speed by the worker's loop)."""
    __slots__ = ("columns",)

    def __init__(self, columns):
        self.columns = tuple(columns)

    def __len__(self):
        return min(map(len, self.columns))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Zipped(column[index] for column in self.columns)
        if not 0 <= index < len(self):
            raise IndexError("Zipped index out of range")
        return tuple(column[index] for column in self.columns)

    def __iter__(self):
        return zip(*self.columns)

    def __reduce__(self):
        return _zipped, (self.columns,)


def dumps_chunk(mode: int, items: list, first_index: int, limit_bytes: int,
                buffers: list | None = None) -> bytes:
    """Pickle a chunk of items; name the item that cannot be pickled or is too large. With a
    ``buffers`` list, big buffers are out of band (see dumps_data)."""
    try:
        data = dumps_data((mode, items), buffers)
    except Exception:
        data = None
    if data is not None and payload_size(data, buffers) <= limit_bytes:
        return data
    for offset, item in enumerate(items):
        index = first_index + offset
        try:
            oob: list = []
            size = payload_size(dumps_data(item, oob), oob)
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
        f"the chunk starting at item #{first_index} is "
        f"{payload_size(data, buffers) / 2**20:.1f} MiB pickled, over "
        f"the limit of {limit_bytes / 2**20:.0f} MiB; pass a smaller chunksize"
    )


def loads(data, buffers=None):
    return pickle.loads(data, buffers=buffers)


# --- exceptions across the wire -----------------------------------------------------------------


def pack_exception(exc: BaseException) -> tuple:
    """(pickle or None, type name, message, traceback text) of a task's exception. Nothing the
    exception does may fail this: its ``__str__``, ``__repr__`` or pickling may raise, and the
    worker still has to say what happened."""
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except BaseException as err:  # noqa: B036 - user code, whatever it raises
        message = f"<str() of the exception failed: {type(err).__name__}>"
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:  # noqa: B036
        tb = "".join(traceback.format_tb(exc.__traceback__)) + f"{type_name}: {message}\n"
    try:
        blob = cloudpickle.dumps(exc, protocol=PROTOCOL)
        pickle.loads(blob)  # an exception that pickles but cannot be rebuilt is sent as text
    except BaseException:  # noqa: B036
        blob = None
    return (blob, type_name, message, tb)


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

"""Big payloads through shared memory when caller and worker share a host (and its /dev/shm).

A payload over protocol.INLINE_MAX_BYTES is pickled with protocol 5, its big buffers (numpy
arrays) out of band, and written to one file in a private per-user directory
(``<shm_dir>/pyworker-<uid>``, mode 0700; files 0600). Only a descriptor travels through Redis:
the file's name, the SHA-256 of its pickle stream and the layout; the descriptor is signed like
any payload (HMAC-SHA256), so the reader checks the signature, maps the file copy-on-write,
copies the pickle stream (the only part that is interpreted) into its own memory, checks its
hash and only then unpickles; arrays are built on the mapping, with no copy.

Same host is proven, never assumed: the directory's identity is a hash of the kernel boot id and
the directory's device and inode numbers. A worker advertises its identity in its info hash, the
caller uses shared memory only if every live worker advertises the caller's own identity, and a
worker that still cannot read a segment (it joined later from elsewhere, or the file is gone)
answers ``resend`` and the caller sends that chunk again through Redis.

File names: ``<jid>.<chunk>.<t|r>.<owner pid namespace>.<owner pid>.<random>``; the owner is
always the caller (t = task, written by the caller; r = result, written by a worker). Who removes
what is in docs/protocol.md ("Shared memory").
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
import secrets
import stat
import threading

log = logging.getLogger("pyworker.shm")

ALIGN = 64  # out-of-band buffers start on 64-byte boundaries (what numpy's SIMD loops like)
TASK, RESULT = "t", "r"
_NAME = re.compile(r"^([A-Za-z0-9_-]{1,64})\.(\d{1,12})\.([tr])\.(\d{1,20})\.(\d{1,10})\.([0-9a-f]{8})$")
_TAG = re.compile(r"^([0-9a-f]{16})\.(\d{1,20})\.(\d{1,10})$")
_ZEROS = bytes(ALIGN)
# What the hash covers: the pickle stream, the only part that is interpreted. The out-of-band
# buffers are raw array bytes, guarded like the process' own memory: a file of this user, mode
# 600, in a folder of mode 700 (a process that could change them could as well read the secret
# from /proc/<pid>/environ). Hashing them too cost a third of this path's CPU and proved little:
# a mapped page can still change after any check.


# Jobs alive in this process (any client): a segment owned by this process whose job is not
# here any more is an orphan (a worker died after writing a result nobody will read).
_live_jobs: set[str] = set()
_live_lock = threading.Lock()


class Unusable(Exception):
    """Shared memory cannot be used here (no boot id, directory not private, ...)."""


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout(stream_len: int, lengths) -> tuple[list[tuple[int, int]], int]:
    """Offsets of the out-of-band buffers after the pickle stream, and the file size."""
    spans, end = [], stream_len
    for n in lengths:
        start = _aligned(end)
        spans.append((start, n))
        end = start + n
    return spans, end


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_started(jid: str) -> None:
    with _live_lock:
        _live_jobs.add(jid)


def job_ended(jid: str) -> None:
    with _live_lock:
        _live_jobs.discard(jid)


class Descriptor:
    """What travels through Redis instead of the payload (ASCII, inside the signed message):
    ``<name> <segment hash hex> <stream length> [<buffer length> ...]``."""

    __slots__ = ("name", "digest", "stream_len", "lengths")

    def __init__(self, name, digest, stream_len, lengths):
        self.name, self.digest, self.stream_len, self.lengths = name, digest, stream_len, lengths

    def encode(self) -> bytes:
        return " ".join([self.name, self.digest, str(self.stream_len),
                         *map(str, self.lengths)]).encode()

    @classmethod
    def parse(cls, data) -> "Descriptor":
        parts = bytes(data).decode("ascii").split(" ")
        if len(parts) < 3 or not _NAME.match(parts[0]) or not re.fullmatch(r"[0-9a-f]{64}",
                                                                            parts[1]):
            raise ValueError("malformed shared-memory descriptor")
        return cls(parts[0], parts[1], int(parts[2]), [int(p) for p in parts[3:]])

    @property
    def jid(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def kind(self) -> str:
        return self.name.split(".")[2]


class Store:
    """The per-user segment directory on this host. ``Store.open(settings)`` is None when shared
    memory is off or unusable (then everything goes through Redis, as before)."""

    def __init__(self, base: str):
        boot = boot_id()
        if boot is None:
            raise Unusable("no /proc/sys/kernel/random/boot_id")
        self.dir = os.path.join(base, f"pyworker-{os.geteuid()}")
        try:
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            pass
        self.dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(self.dirfd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            os.close(self.dirfd)
            raise Unusable(f"{self.dir} is not private to this user (owner uid {st.st_uid}, "
                           f"mode {stat.S_IMODE(st.st_mode):o}; expected uid {os.geteuid()}, "
                           "mode 700)")
        self.ident = hashlib.sha256(
            f"{boot} {st.st_dev} {st.st_ino}".encode()).hexdigest()[:16]
        self.pidns = pid_namespace()
        self._tag = (None, "")

    @classmethod
    def open(cls, settings) -> "Store | None":
        if not settings.shared_memory:
            return None
        try:
            return cls(settings.shm_dir)
        except Unusable as exc:  # suspicious: say so
            log.warning("pyworker: shared memory is off (big payloads go through Redis): %s", exc)
        except OSError as exc:  # no (writable) shm_dir here: nothing unusual in a container
            log.info("pyworker: shared memory is off (big payloads go through Redis): %s", exc)
        return None

    def close(self):
        fd, self.dirfd = self.dirfd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # --- tags and names ---------------------------------------------------------------------------

    def tag(self) -> str:
        """What a caller puts in every task header: this directory's identity and the owner."""
        pid = os.getpid()
        if self._tag[0] != pid:  # (a forked child has its own)
            self._tag = (pid, f"{self.ident}.{self.pidns}.{pid}")
        return self._tag[1]

    @staticmethod
    def parse_tag(tag: str):
        """(identity, owner) of a task header's shared-memory field, or None."""
        m = _TAG.match(tag)
        return (m.group(1), f"{m.group(2)}.{m.group(3)}") if m else None

    # --- segments ---------------------------------------------------------------------------------

    def write(self, jid: str, chunk: int, kind: str, owner: str, stream, buffers) -> Descriptor:
        """One file with the pickle stream and its out-of-band buffers; its descriptor."""
        name = f"{jid}.{chunk}.{kind}.{owner}.{secrets.token_hex(4)}"
        if not _NAME.match(name):
            raise ValueError(f"bad segment name {name!r}")
        lengths = [b.nbytes for b in buffers]
        spans, size = layout(len(stream), lengths)
        pieces, end = [memoryview(stream).cast("B")], len(stream)
        for buf, (start, n) in zip(buffers, spans):
            if start > end:
                pieces.append(memoryview(_ZEROS[: start - end]))
            pieces.append(memoryview(buf).cast("B"))
            end = start + n
        digest = hashlib.sha256(stream).hexdigest()
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.dirfd)
        try:
            for view in pieces:
                while view:
                    view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            self.remove(name)
            raise
        os.close(fd)
        return Descriptor(name, digest, len(stream), lengths)

    def read(self, desc: Descriptor, max_bytes: int):
        """The verified pickle stream and out-of-band buffers of a segment.

        The file is mapped copy-on-write (MAP_PRIVATE): arrays unpickled from it are writable,
        and what this process writes never reaches the file. The pickle stream, the only part
        that is interpreted, is copied into this process's memory before it is hashed, so what
        is unpickled is exactly what was checked; the buffers are raw array data.
        OSError if it cannot be read here; SegmentTampered if its bytes are not the signed ones."""
        spans, size = layout(desc.stream_len, desc.lengths)
        if desc.stream_len < 0 or any(n < 0 for n in desc.lengths) or not 0 < size <= max_bytes:
            raise ValueError(f"shared-memory segment of {size} bytes: not within the message "
                             "limit")
        fd = os.open(desc.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dirfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise PermissionError(f"segment {desc.name} is not a private file of this user")
            if st.st_size != size:
                raise SegmentTampered(f"segment {desc.name} is {st.st_size} bytes, its signed "
                                      f"descriptor says {size}")
            try:
                view = memoryview(mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                                            prot=mmap.PROT_READ | mmap.PROT_WRITE))
            except OSError:  # e.g. out of map areas: read it instead
                view, got = memoryview(bytearray(size)), 0
                while got < size:
                    n = os.readv(fd, [view[got:]])
                    if n == 0:
                        raise SegmentTampered(f"segment {desc.name} was truncated while read")
                    got += n
        finally:
            os.close(fd)
        stream = bytes(view[: desc.stream_len])
        if hashlib.sha256(stream).hexdigest() != desc.digest:
            raise SegmentTampered(f"segment {desc.name} does not match the hash in its signed "
                                  "message")
        return stream, [view[start: start + n] for start, n in spans]

    def remove(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.dirfd)
        except (FileNotFoundError, OSError):
            pass

    def names(self) -> list[str]:
        try:
            with os.scandir(self.dirfd) as it:
                return [e.name for e in it]
        except OSError:
            return []

    def remove_job(self, jid: str) -> int:
        """Remove every segment of a job (ended or cancelled); how many were removed."""
        prefix = jid + "."
        gone = 0
        for name in self.names():
            if name.startswith(prefix):
                self.remove(name)
                gone += 1
        return gone

    def sweep(self) -> int:
        """Remove orphans: segments whose owner process is gone (same pid namespace only, so a
        pid is never judged from another container), and segments owned by this process whose
        job is not alive in it. Returns how many were removed."""
        me = (self.pidns, str(os.getpid()))
        with _live_lock:
            live = set(_live_jobs)
        gone = 0
        for name in self.names():
            m = _NAME.match(name)
            if not m:
                continue  # not ours to judge
            jid, ns, pid = m.group(1), m.group(4), m.group(5)
            if ns != self.pidns:
                continue
            if (ns, pid) == me:
                orphan = jid not in live
            else:
                orphan = not pid_alive(int(pid))
            if orphan:
                self.remove(name)
                gone += 1
        return gone


class SegmentTampered(Exception):
    """A segment's bytes are not the ones its signed message describes."""

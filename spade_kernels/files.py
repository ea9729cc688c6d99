"""Files that survive faults: atomic writes, checksums, a bounded-memory safetensors reader, a directory lock.

* :func:`atomic_write` — a temporary file in the target's folder, fsync,
  rename: never half a file; the file gets the mode the user's umask gives
  (as ``open`` would), whatever the writer library chose.
* :func:`checksums` / :func:`verify_checksums` — a CRC-32 of every tensor's
  bytes in a nested state, so a damaged file is refused, never trained on.
* :func:`read_safetensors_header` / :func:`read_tensor_into` — the shapes of
  a safetensors file before anything is allocated, then each tensor read
  straight into its destination (no second copy of the weights in memory),
  its CRC-32 checked as it is read.
* :class:`DirectoryLock` — an advisory lock on an output directory: a second
  run refuses at once, naming the holder's PID; the kernel releases it when
  the holder dies, so a killed run's lock is taken over.
* :func:`one_line` — an exception as one line (torch's unpickler and
  safetensors write paragraphs).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = [
    "CHECKSUM_KEY",
    "TMP_PREFIX",
    "DirectoryLock",
    "atomic_write",
    "checksums",
    "crc32",
    "exception_chain",
    "file_mode",
    "header_dtype",
    "is_disk_full",
    "one_line",
    "read_json",
    "read_safetensors_header",
    "read_tensor_into",
    "remove_stale_temporaries",
    "save_torch",
    "verify_checksums",
    "write_error",
]

#: Temporary files of an unfinished write start with this (and are removed by the next write there).
TMP_PREFIX = ".tmp-spade-"
#: The safetensors metadata key (and training-state key) holding the per-tensor CRC-32s.
CHECKSUM_KEY = "spade_kernels.crc32"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete what a killed write left in ``folder`` (``TMP_PREFIX…-PID`` of a dead PID); returns their names.

    A temporary whose writer is still running (another process writing into
    the same folder) is left alone.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if not (entry.name.startswith(TMP_PREFIX) and entry.is_file()):
                continue
            pid = entry.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)
                removed.append(entry.name)
    return removed


def file_mode() -> int:
    """The mode a new file gets from ``open()``: 0o666 less the process's umask."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no getter elsewhere: read it by setting it back
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file next to ``path``, then make it ``path`` atomically.

    The temporary file is fsynced before the rename and the folder after it,
    so a crash leaves either the old file or the new one, never a mix; a
    write that fails (a full disk, a kill) leaves the old file as it was and
    removes its temporary.  The new file has the mode of :func:`file_mode`
    (safetensors writes 0600, ``torch.save`` the umask's).
    """
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}"
    try:
        write(os.fspath(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def exception_chain(exc: BaseException | None):
    """``exc`` and what it was raised from or during (torch and safetensors wrap the OS error), and the
    per-rank failures a ``torch.distributed.checkpoint`` error collects."""
    seen = set()
    todo = [exc]
    while todo:
        exc = todo.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        todo.append(exc.__cause__ or exc.__context__)
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):  # DCP: {rank: (exception, traceback)}
            for value in failures.values():
                inner = value[0] if isinstance(value, tuple) and value else value
                if isinstance(inner, BaseException):
                    todo.append(inner)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a full disk, a quota or a file-size limit."""
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "File too large" in text:
            return True
    return False


def write_error(exc: BaseException) -> str:
    """Why a write failed, in a few words: a full disk, the OS error it wraps, or the error's first line."""
    if is_disk_full(exc):
        return "no space left on device"
    os_error = next((e for e in exception_chain(exc) if isinstance(e, OSError)), None)
    if os_error is not None:
        return os_error.strerror or one_line(os_error)
    return one_line(exc)


def save_torch(obj, path: str) -> None:
    """``torch.save`` through a Python file, so a failed write carries the OS error (torch's own is opaque)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def read_json(path: str | os.PathLike, what: str = "valid JSON"):
    """The JSON value in ``path``; a one-line ``ValueError`` naming it (``not {what}``) when unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not {what} ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({one_line(exc)})") from None


# -- checksums ---------------------------------------------------------------------------------


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def crc32(t: torch.Tensor, value: int = 0) -> int:
    """CRC-32 of a tensor's bytes (in its dtype, C order), continuing from ``value``."""
    return zlib.crc32(_bytes(t), value)


def _tensors(obj, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key], f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _tensors(item, f"{prefix}/{i}" if prefix else str(i))


def checksums(obj) -> dict[str, int]:
    """``{path: CRC-32}`` of every tensor in a nested dict/list/tuple (path: the keys joined by ``/``)."""
    return {path: crc32(t) for path, t in _tensors(obj)}


def verify_checksums(obj, expected: dict[str, int], source: str) -> None:
    """Raise a one-line ``ValueError`` naming ``source`` unless ``obj``'s tensors have ``expected``'s CRC-32s."""
    found = checksums(obj)
    if set(found) != set(expected):
        missing = sorted(set(expected) - set(found)) + sorted(set(found) - set(expected))
        raise ValueError(f"{source} is damaged: its tensors do not match its checksums ({missing[0]} …)")
    bad = [path for path, value in found.items() if value != expected[path]]
    if bad:
        raise ValueError(
            f"{source} is damaged: {len(bad)} tensor(s) fail their CRC-32 checksum (first: {bad[0]})"
        )


# -- safetensors: header first, then each tensor into its place ---------------------------------

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
#: The largest safetensors header read (the format's own limit is 100 MB).
_MAX_HEADER = 100 << 20


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """``({name: {"dtype", "shape", "data_offsets"}, "__metadata__": …}, data start)`` of a safetensors file.

    Reads only the header; checks that every tensor's byte range lies in
    the file and matches its dtype and shape (a truncated or foreign file is
    a ``ValueError`` naming it).
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file (its header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise ValueError(f"{path} is damaged: its __metadata__ is not a map of strings")
    start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
            if any(s < 0 for s in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = 1
        for s in shape:
            count *= s
        if end - begin != count * itemsize or begin < 0 or start + end > size:
            raise ValueError(
                f"{path} is truncated or damaged: tensor {name!r} ({info['dtype']}, shape {shape}) needs bytes "
                f"{start + begin}–{start + end} of a {size}-byte file"
            )
    return header, start


def header_dtype(info: dict) -> torch.dtype:
    return _DTYPES[info["dtype"]]


#: Bytes converted at a time when a tensor is read into a destination of another dtype or device.
READ_CHUNK = 16 << 20


def read_tensor_into(
    path: str | os.PathLike,
    header: dict,
    start: int,
    name: str,
    dest: torch.Tensor,
    expected_crc: int | None,
    rows: tuple[int, int] | None = None,
) -> None:
    """Read tensor ``name`` of a safetensors file (or its rows ``lo:hi``) into ``dest``, checking its CRC-32 if given.

    A contiguous CPU destination of the file's dtype is filled in place
    (``readinto``): no second copy.  Otherwise the bytes are read
    :data:`READ_CHUNK` at a time, converted and copied, so the extra memory
    is one chunk whatever the tensor's size.
    """
    info = header[name]
    dtype = header_dtype(info)
    itemsize = torch.empty((), dtype=dtype).element_size()
    begin, end = (int(o) for o in info["data_offsets"])
    if rows is not None:
        row_bytes = itemsize
        for s in info["shape"][1:]:
            row_bytes *= int(s)
        begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
    if dest.numel() * itemsize != end - begin:
        raise ValueError(f"{path}: tensor {name!r} does not fit a destination of shape {tuple(dest.shape)}")
    value = 0
    with open(path, "rb") as f:
        f.seek(start + begin)
        in_place = dest.is_contiguous() and dest.device.type == "cpu" and dest.dtype == dtype
        if in_place and sys.byteorder == "little":
            view = _bytes_view(dest.view(-1))
            if f.readinto(view) != end - begin:
                raise ValueError(f"{path} is truncated: tensor {name!r} ends early")
            value = zlib.crc32(view)
        else:
            per = max(1, READ_CHUNK // itemsize)
            total = (end - begin) // itemsize
            target = (
                dest.view(-1)
                if dest.is_contiguous()
                else torch.empty(total, dtype=dest.dtype, device=dest.device)
            )
            for first in range(0, total, per):
                raw = bytearray(min(per, total - first) * itemsize)
                if f.readinto(raw) != len(raw):
                    raise ValueError(f"{path} is truncated: tensor {name!r} ends early")
                value = zlib.crc32(raw, value)
                chunk = torch.frombuffer(raw, dtype=dtype)
                if sys.byteorder != "little":
                    chunk = (
                        chunk.view(torch.uint8)
                        .view(-1, itemsize)
                        .flip(1)
                        .contiguous()
                        .view(dtype)
                        .reshape(-1)
                    )
                target[first : first + chunk.numel()].copy_(chunk)
            if not dest.is_contiguous():
                dest.copy_(target.view(dest.shape))
    if expected_crc is not None and value != expected_crc:
        raise ValueError(f"{path} is damaged: tensor {name!r} fails its CRC-32 checksum")


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(bytearray())


# -- an output directory's lock ----------------------------------------------------------------

LOCK_NAME = ".spade-lock"


class DirectoryLock:
    """An advisory lock (``flock``) on ``folder/.spade-lock``, holding the holder's PID.

    ``acquire`` raises a one-line ``RuntimeError`` naming the holder's PID
    when another process holds it.  The kernel drops the lock when its
    holder's process ends however it ends, so a killed run's lock file is
    simply taken over (its stale PID overwritten).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None
        #: Why the lock could not be taken on a filesystem without locks (None otherwise).
        self.why_not: str | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> DirectoryLock:
        """Take the lock; RuntimeError naming the holder when another process has it.

        A filesystem that does not lock (some network mounts) leaves it
        untaken, with ``why_not`` saying why; the caller may go on.
        """
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RuntimeError(f"cannot open the lock file {self.path} ({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    self.why_not = f"its filesystem cannot lock {self.path.name} ({exc.strerror or exc})"
                    return self
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RuntimeError(
                    f"{self.path.parent} is in use by another run (PID {holder}); wait for it to end or "
                    "pick another output directory"
                ) from None
            # The holder unlinks the file before it unlocks: a lock won on an unlinked file is no lock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # before the unlock (see acquire)
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- errors as one line ------------------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: its type and first line, or what torch's weights-only unpickler refused."""
    text = str(exc)
    if "Weights only load failed" in text:
        import re

        found = re.search(r"GLOBAL (\S+)", text)
        what = f" ({found.group(1)})" if found else ""
        return f"it holds pickled Python objects{what}, not only tensors, which torch.load will not unpickle safely"
    first = text.strip().splitlines()[0] if text.strip() else ""
    if len(first) > 160 and ". " in first[40:]:  # a paragraph on one line: its first sentence
        first = first[: first.index(". ", 40) + 1]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__

"""One block file: its name, its on-disk format, and reading and writing it (NOTES.md §1, §5, §7).

A block file is a header page followed by the block's bytes. The header names what the block
is (key digest, index, length), every field of which is checked against what the reader
expects, so a file in the wrong place is never served; and it carries the CRC-32 of the data
(zlib's runs at ~2.7 GB/s here, four times blake2b). The header is padded to a whole page so
that the data is page-aligned in the file and the block can be written with O_DIRECT.

Everything here but `digest` and `block_ref` runs in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_MAGIC = b"FSMB"
_FORMAT = 2  # 1 had a 44-byte header; it is part of the block names, so old files just age out
_HEADER = struct.Struct("<4sIQQ16sI")  # magic, format, index, length, key digest, data crc
PAGE = 4096
"""O_DIRECT's alignment of buffer, offset and length (any logical block size up to 4 KiB); a
fetch of the far part of a block starts on one too (`Flights`)."""
HEADER_SIZE = PAGE
"""Bytes each block file holds beyond its data; they count against the budget."""


class CorruptBlock(Exception):
    """A block file failed verification; the message says how."""


@dataclass(frozen=True, slots=True)
class Ref:
    """One block of one object: its file name (relative to the directory) and its byte range."""

    name: str
    digest: bytes
    index: int
    start: int
    end: int


def digest(block_size: int, key: str) -> bytes:
    """Name blocks by key and block size, so stores with another block size never mix."""
    material = f"{_FORMAT}\n{block_size}\n{key}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(material, digest_size=16).digest()


def block_ref(block_size: int, digest: bytes, size: int, index: int) -> Ref:
    """Block `index` of an object of `size` bytes: `<ab>/<digest>-<index>`, `<ab>` its shard."""
    hexdigest = digest.hex()
    start = index * block_size
    return Ref(
        name=f"{hexdigest[:2]}/{hexdigest}-{index}",
        digest=digest,
        index=index,
        start=start,
        end=min(start + block_size, size),
    )


def header(ref: Ref, data: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, _FORMAT, ref.index, len(data), ref.digest, zlib.crc32(data))


def read_block_file(path: str, ref: Ref) -> tuple[bytes, int, float] | None:
    """The verified data of a block file with its size and mtime; None if it does not exist.

    Raises CorruptBlock when the file is not exactly the complete block it should be.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:  # an open file stays readable even if another process evicts it now
        st = os.fstat(fd)
        length = ref.end - ref.start
        if st.st_size != HEADER_SIZE + length:
            raise CorruptBlock(f"{st.st_size} bytes, expected {HEADER_SIZE + length}")
        head = os.pread(fd, _HEADER.size, 0)
        data = os.pread(fd, length, HEADER_SIZE)
    finally:
        os.close(fd)
    magic, fmt, index, stored_length, stored_digest, crc = _HEADER.unpack(head)
    if (magic, fmt, index, stored_length, stored_digest) != (
        _MAGIC,
        _FORMAT,
        ref.index,
        length,
        ref.digest,
    ):
        raise CorruptBlock("header names another block")
    if len(data) != length or zlib.crc32(data) != crc:
        raise CorruptBlock("data checksum mismatch")
    return data, st.st_size, st.st_mtime


def write_block_file(
    tmp: Path, final: str, ref: Ref, data: bytes, victims: list[str], direct: bool
) -> bool:
    """Delete the victims' files, then write a complete block under this process's own
    temporary name and rename it to its final name; return whether O_DIRECT could be used.

    Only complete files ever carry a block's name; on failure the temporary file goes. There is
    no fsync: a block damaged by a power cut fails its size, header or CRC check on read and is
    fetched again. O_DIRECT (from a reused buffer) skips the page cache: allocating fresh
    page-cache pages was the largest CPU cost of a cold read here (~2.5 s per GiB written,
    against ~0.7 s direct), and the reader already has the bytes. Filesystems that refuse
    O_DIRECT (EINVAL) get a buffered write, and the caller stops asking.
    The checksum is computed here too: zlib releases the GIL, the event loop's thread is busy.
    """
    unlink_all(victims)
    head = header(ref, data)
    try:
        if direct:
            try:
                _write_direct(tmp, head, data)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                direct = False
        if not direct:
            _write_buffered(tmp, head, data)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:  # the shard's first block
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.dirname(final), 0o700)
            os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return direct


# Page-aligned write buffers, reused so that their pages are faulted in once per process, not
# once per block (a fresh mapping per block cost as much as the page cache it avoids). At most
# one per concurrent writer; list.pop/append are atomic under the GIL.
_direct_buffers: list[mmap.mmap] = []


def _write_direct(tmp: Path, head: bytes, data: bytes) -> None:
    size = HEADER_SIZE + len(data)
    padded = -(-size // PAGE) * PAGE
    buffer = _direct_buffers.pop() if _direct_buffers else mmap.mmap(-1, padded)
    if len(buffer) < padded:
        buffer.close()
        buffer = mmap.mmap(-1, padded)
    try:
        buffer[: len(head)] = head  # the rest of the header page is never written: zeros
        buffer[HEADER_SIZE:size] = data
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_DIRECT
        fd = os.open(tmp, flags, 0o600)
        try:
            with memoryview(buffer) as view:
                written = os.write(fd, view[:padded])
            if written != padded:  # direct writes are not resumed mid-page
                raise OSError(errno.ENOSPC, f"short write: {written} of {padded} bytes")
            if padded != size:  # the last block of an object: drop the padding
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # an EINVAL fallback writes the same name again
        raise
    finally:
        _direct_buffers.append(buffer)


def _write_buffered(tmp: Path, head: bytes, data: bytes) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        page = head.ljust(HEADER_SIZE, b"\0")
        written = os.writev(fd, [page, data])
        if written < len(page) + len(data):  # a short write (rare): the rest
            _write_all(fd, (page + data)[written:])
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def unlink_all(paths: list[str]) -> None:
    """Delete block files; one already gone was evicted by another process first."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not evict cache block %s: %s", path, exc)

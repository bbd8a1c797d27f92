"""Reading a zip archive as it streams past, guided by its central directory.

A zip's table of contents, the central directory, is at its end, and a local header need not
carry its entry's sizes (flag bit 3: they follow the data in a data descriptor, which is how
streaming writers, the likely kind behind a batch export, write them). So the directory is read
first, from a ranged read of the archive's tail, and it alone says where each entry starts and
how long its data is. The entries are then read front to back in one pass: nothing is held but
the entry being read, and nothing is written to disk. A bad entry (CRC, length, a truncated
deflate stream, a local header that disagrees with the directory) costs only itself: where the
next entry starts comes from the directory, not from the bad one.

Pure parsing: no I/O here. Names are only ever compared, never used as paths.
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

TAIL = 256 << 10
"""Bytes to read from the end of an archive: its end records and, for up to about a thousand
entries with names like `<asset-id>.png`, its whole central directory."""

_END = struct.Struct("<4s4H2LH")  # end of central directory record
_END_SIG = b"PK\x05\x06"
_LOCATOR = struct.Struct("<4sLQL")  # ZIP64 end of central directory locator
_LOCATOR_SIG = b"PK\x06\x07"
_END64 = struct.Struct("<4sQ2H2L4Q")  # ZIP64 end of central directory record
_END64_SIG = b"PK\x06\x06"
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory file header
_CENTRAL_SIG = b"PK\x01\x02"
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header
_LOCAL_SIG = b"PK\x03\x04"
_ZIP64_EXTRA = 0x0001
_MAX16, _MAX32 = 0xFFFF, 0xFFFFFFFF
_ENCRYPTED, _UTF8 = 0x1, 0x800
STORED, DEFLATED = 0, 8


class ZipError(Exception):
    """The bytes are not a zip archive this module can read; the message says why."""


@dataclass(frozen=True, slots=True)
class Directory:
    """Where the central directory is in the archive, and how many entries it lists."""

    offset: int
    length: int
    count: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One member as the central directory describes it."""

    name: str
    offset: int  # of its local header
    compressed: int
    size: int
    crc: int
    method: int
    flags: int


def find_directory(tail: bytes, total: int) -> Directory:
    """Where the central directory of an archive of `total` bytes is, from its last bytes.

    The end record is the last `PK\\5\\6` whose comment ends exactly at the end of the archive
    (a comment may itself contain the signature). Its ZIP64 counterpart is followed when a
    field is saturated; it must lie within `tail` too.
    """
    base = total - len(tail)
    at = tail.rfind(_END_SIG)
    while at >= 0:
        if len(tail) - at >= _END.size:
            comment = _END.unpack_from(tail, at)[7]
            if at + _END.size + comment == len(tail):
                break
        at = tail.rfind(_END_SIG, 0, at)
    if at < 0:
        raise ZipError("no end of central directory record: not a zip archive")
    _, disk, start_disk, _, count, length, offset, _ = _END.unpack_from(tail, at)
    if _MAX16 in (disk, count) or _MAX32 in (length, offset):
        locator = at - _LOCATOR.size
        if locator < 0 or tail[locator : locator + 4] != _LOCATOR_SIG:
            raise ZipError("a ZIP64 archive without its end record locator")
        record = _LOCATOR.unpack_from(tail, locator)[2] - base
        if record < 0 or tail[record : record + 4] != _END64_SIG:
            raise ZipError("the ZIP64 end record is not where its locator says")
        fields = _END64.unpack_from(tail, record)
        disk, start_disk, count, length, offset = fields[4], fields[5], fields[7], *fields[8:]
    if disk != 0 or start_disk != 0:
        raise ZipError("a multi-volume archive")
    if offset + length > total:
        raise ZipError("the central directory lies beyond the end of the archive")
    return Directory(offset, length, count)


def parse_directory(data: bytes, directory: Directory) -> list[Entry]:
    """The entries `data` (the whole central directory) lists, in the order it lists them."""
    if len(data) != directory.length:
        raise ZipError(f"central directory of {len(data)} bytes, expected {directory.length}")
    entries: list[Entry] = []
    at = 0
    for _ in range(directory.count):
        if data[at : at + 4] != _CENTRAL_SIG or at + _CENTRAL.size > len(data):
            raise ZipError(f"central directory entry {len(entries)} is damaged")
        fields = _CENTRAL.unpack_from(data, at)
        flags, method, crc, compressed, size = fields[3], fields[4], fields[7], *fields[8:10]
        name_length, extra_length, comment_length, offset = *fields[10:13], fields[16]
        name_at = at + _CENTRAL.size
        extra_at = name_at + name_length
        at = extra_at + extra_length + comment_length
        if at > len(data):
            raise ZipError(f"central directory entry {len(entries)} is damaged")
        size, compressed, offset = _zip64_fields(
            data[extra_at : extra_at + extra_length], size, compressed, offset
        )
        raw = data[name_at:extra_at]
        name = raw.decode("utf-8" if flags & _UTF8 else "cp437", errors="replace")
        entries.append(Entry(name, offset, compressed, size, crc, method, flags))
    return entries


def _zip64_fields(extra: bytes, size: int, compressed: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset, the saturated ones taken from the ZIP64 extra field, in its order."""
    wanted = [value == _MAX32 for value in (size, compressed, offset)]
    if not any(wanted):
        return size, compressed, offset
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<2H", extra, at)
        if kind == _ZIP64_EXTRA:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
            if len(values) < sum(wanted):
                raise ZipError("a ZIP64 extra field too short for its entry")
            found = iter(values)
            size, compressed, offset = (
                next(found) if saturated else value
                for saturated, value in zip(wanted, (size, compressed, offset), strict=True)
            )
            return size, compressed, offset
        at += 4 + length
    raise ZipError("an entry with saturated sizes and no ZIP64 extra field")


def span(
    entries: Iterable[Entry], wanted: Iterable[Entry], directory: Directory
) -> tuple[int, int]:
    """The bytes `[start, end)` that hold every wanted entry: from the first one's local header
    to where the entry after the last one starts (or the directory, after the last entry)."""
    starts = sorted({entry.offset for entry in entries} | {directory.offset})
    chosen = [entry.offset for entry in wanted]
    if not chosen:
        return 0, 0
    last = max(chosen)
    return min(chosen), next(start for start in starts if start > last)


Found = Callable[[Entry, bytes], Awaitable[None]]
Rejected = Callable[[Entry, str], Awaitable[None]]


class EntryReader:
    """The sink of a download of `span(...)`: cuts the bytes into the wanted entries as they
    arrive, hands each complete, checked entry to `found`, and each bad one, with the reason,
    to `rejected`. Entries not reached when the bytes stop are neither.

    Memory: the one entry being read (its data, inflated as it arrives). The caller bounds it
    by wanting only entries whose stated size it accepts; an entry that inflates to more than
    it states is stopped at one byte over.
    """

    def __init__(self, wanted: Iterable[Entry], start: int, found: Found, rejected: Rejected):
        self._todo = deque(sorted(wanted, key=lambda entry: entry.offset))
        self._at = start  # archive offset of the next byte to arrive
        self._found = found
        self._rejected = rejected
        self._current: _Member | None = None

    @property
    def pending(self) -> list[Entry]:
        """The wanted entries not yet handed to `found` or `rejected`."""
        return list(self._todo)

    async def __call__(self, piece: bytes) -> None:
        view = memoryview(piece)
        while view and self._todo:
            entry = self._todo[0]
            if self._current is None:
                if self._at > entry.offset:
                    await self._reject("it overlaps the entry before it")
                    continue
                if self._at < entry.offset:  # bytes of entries nobody wants
                    skip = min(len(view), entry.offset - self._at)
                    view, self._at = view[skip:], self._at + skip
                    continue
                self._current = _Member(entry)
            taken = self._current.take(view)
            view, self._at = view[taken:], self._at + taken
            if self._current.complete:
                member, self._current = self._current, None
                fault = member.fault()
                if fault is not None:
                    await self._reject(fault)
                else:
                    self._todo.popleft()
                    await self._found(entry, member.data())

    async def _reject(self, reason: str) -> None:
        await self._rejected(self._todo.popleft(), reason)


class _Member:
    """One entry being read: its local header, then its data, checked as it flows."""

    def __init__(self, entry: Entry) -> None:
        self._entry = entry
        self._header = bytearray()
        self._header_length = _LOCAL.size  # until the fixed part says how long the rest is
        self._left = entry.compressed  # data bytes still to come
        self._parts: list[bytes] = []
        self._length = 0
        self._crc = 0
        self._problem: str | None = None
        if entry.flags & _ENCRYPTED:
            self._problem = "it is encrypted"
        elif entry.method not in (STORED, DEFLATED):
            self._problem = f"compression method {entry.method} is not supported"
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS) if entry.method == DEFLATED else None

    @property
    def complete(self) -> bool:
        return len(self._header) == self._header_length and not self._left

    def take(self, view: memoryview) -> int:
        """Consume what of `view` belongs to this entry; return how many bytes that was."""
        taken = 0
        if len(self._header) < self._header_length:
            taken = min(len(view), self._header_length - len(self._header))
            self._header += view[:taken]
            if len(self._header) == _LOCAL.size:
                self._read_fixed_header()
            if len(self._header) < self._header_length:
                return taken
            if self._problem is None:
                self._check_name()
        data = view[taken : taken + self._left]
        self._left -= len(data)
        if self._problem is None and data:
            self._add(bytes(data))
        return taken + len(data)

    def _read_fixed_header(self) -> None:
        fields = _LOCAL.unpack_from(self._header)
        if fields[0] != _LOCAL_SIG:
            self._problem = "no local header where the directory says"
            self._left = 0  # nothing of it can be trusted: stop here
            return
        self._header_length += fields[9] + fields[10]

    def _check_name(self) -> None:
        name_length = _LOCAL.unpack_from(self._header)[9]
        raw = bytes(self._header[_LOCAL.size : _LOCAL.size + name_length])
        name = raw.decode("utf-8" if self._entry.flags & _UTF8 else "cp437", errors="replace")
        if name != self._entry.name:
            self._problem = "its local header names another file"

    def _add(self, data: bytes) -> None:
        room = self._entry.size - self._length
        if self._inflate is not None:
            try:
                data = self._inflate.decompress(data, room + 1)
            except zlib.error as exc:
                self._problem = f"its data does not inflate ({exc})"
                return
        if len(data) > room:
            self._problem = f"it holds more than the {self._entry.size:,} bytes it states"
            return
        self._parts.append(data)
        self._length += len(data)
        self._crc = zlib.crc32(data, self._crc)

    def fault(self) -> str | None:
        """Why the complete entry is bad, or None when its bytes are right."""
        if self._problem is not None:
            return self._problem
        if self._inflate is not None and not self._inflate.eof:
            return "its deflate stream is cut short"
        if self._length != self._entry.size:
            return f"it holds {self._length:,} bytes, not the {self._entry.size:,} it states"
        if self._crc != self._entry.crc:
            return "its CRC-32 does not match"
        return None

    def data(self) -> bytes:
        return b"".join(self._parts)

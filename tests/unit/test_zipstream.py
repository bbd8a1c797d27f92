"""Reading zips as they stream past: archives written by Python's zipfile (seekable or not, stored
or deflated, ZIP64), fed in pieces of every size, and damaged ones whose bad entries must be
rejected without losing the good ones after them.
"""

from __future__ import annotations

import dataclasses
import io
import random
import struct
import zipfile
from collections.abc import Iterable

import pytest
import trio

from fsmount import zipstream
from fsmount.demo.scenario_export import Unseekable

FILES = {
    "asset_a.png": random.Random(1).randbytes(70_000),
    "asset_b.jpg": b"jpeg " * 9_000,  # compresses well
    "dir/asset_c.glb": b"",
    "asset_d\u00e9.mp4": random.Random(2).randbytes(3_000),
}


def make_zip(
    files: dict[str, bytes] = FILES,
    *,
    method: int = zipfile.ZIP_DEFLATED,
    streamed: bool = True,
    comment: bytes = b"",
) -> bytes:
    """An archive as a streaming writer makes it (data descriptors), or a seekable one."""
    out: Unseekable | io.BytesIO = Unseekable() if streamed else io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as archive:
        archive.comment = comment
        for name, data in files.items():
            archive.writestr(name, data)
    return bytes(out.data) if isinstance(out, Unseekable) else out.getvalue()


def directory_of(data: bytes, tail: int = zipstream.TAIL) -> list[zipstream.Entry]:
    directory = zipstream.find_directory(data[-tail:], len(data))
    return zipstream.parse_directory(
        data[directory.offset : directory.offset + directory.length], directory
    )


def collecting(
    wanted: list[zipstream.Entry], start: int
) -> tuple[dict[str, bytes], dict[str, str], zipstream.EntryReader]:
    """A reader of the wanted entries from `start`, and what it found and rejected (so far)."""
    found: dict[str, bytes] = {}
    rejected: dict[str, str] = {}

    async def on_found(entry: zipstream.Entry, body: bytes) -> None:
        found[entry.name] = body

    async def on_rejected(entry: zipstream.Entry, reason: str) -> None:
        rejected[entry.name] = reason

    return found, rejected, zipstream.EntryReader(wanted, start, on_found, on_rejected)


def read(
    data: bytes, wanted: Iterable[str] | None = None, pieces: Iterable[int] = (1 << 20,)
) -> tuple[dict[str, bytes], dict[str, str], list[str]]:
    """Stream the span of the wanted entries (all by default) through an EntryReader, in
    pieces of the given sizes (cycled): what it found, what it rejected and why, what it
    never reached."""
    entries = directory_of(data)
    directory = zipstream.find_directory(data[-zipstream.TAIL :], len(data))
    chosen = [e for e in entries if wanted is None or e.name in wanted]
    start, end = zipstream.span(entries, chosen, directory)
    found, rejected, reader = collecting(chosen, start)

    async def main() -> None:
        sizes = list(pieces)
        at, turn = start, 0
        while at < end:
            size = sizes[turn % len(sizes)]
            await reader(data[at : min(at + size, end)])
            at, turn = at + size, turn + 1

    trio.run(main)
    return found, rejected, [e.name for e in reader.pending]


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("streamed", [True, False])
@pytest.mark.parametrize("pieces", [(1,), (7, 4096, 13), (1 << 20,)])
def test_every_entry_comes_out_whole_whatever_the_pieces(
    method: int, streamed: bool, pieces: tuple[int, ...]
) -> None:
    data = make_zip(method=method, streamed=streamed)
    found, rejected, pending = read(data, pieces=pieces)
    assert found == FILES
    assert rejected == {} and pending == []


def test_only_the_wanted_entries_are_read_and_the_span_stops_at_the_next_entry() -> None:
    data = make_zip()
    entries = directory_of(data)
    assert [e.name for e in entries] == list(FILES)
    directory = zipstream.find_directory(data[-zipstream.TAIL :], len(data))
    wanted = [entries[1]]
    assert zipstream.span(entries, wanted, directory) == (entries[1].offset, entries[2].offset)
    assert zipstream.span(entries, [entries[-1]], directory)[1] == directory.offset
    assert zipstream.span(entries, [], directory) == (0, 0)
    found, rejected, _ = read(data, wanted=["asset_b.jpg", "asset_d\u00e9.mp4"], pieces=(999,))
    assert found == {k: FILES[k] for k in ("asset_b.jpg", "asset_d\u00e9.mp4")}
    assert rejected == {}


def test_a_directory_beyond_the_tail_is_located_and_a_comment_does_not_confuse_it() -> None:
    data = make_zip(comment=b"PK\x05\x06 looks like an end record")
    directory = zipstream.find_directory(data[-200:], len(data))
    assert directory.offset + directory.length < len(data) - 22
    assert directory.count == len(FILES)
    with pytest.raises(zipstream.ZipError, match="not a zip"):
        zipstream.find_directory(b"\0" * 100, 100)


def test_zip64_records_and_extra_fields_are_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1000)  # offsets and sizes above it: ZIP64
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)  # more entries: a ZIP64 end record
    data = make_zip(streamed=False)
    assert b"PK\x06\x06" in data[-200:]
    entries = directory_of(data)
    assert [(e.name, e.size) for e in entries] == [(n, len(b)) for n, b in FILES.items()]
    assert read(data)[0] == FILES


def damage(data: bytes, entry: zipstream.Entry, at: int, value: bytes) -> bytes:
    """`data` with `value` written `at` bytes into the entry's data (after its local header)."""
    name_length, extra_length = struct.unpack_from("<2H", data, entry.offset + 26)
    start = entry.offset + 30 + name_length + extra_length + at
    return data[:start] + value + data[start + len(value) :]


def test_damaged_entries_are_rejected_and_the_others_still_come() -> None:
    data = make_zip(method=zipfile.ZIP_STORED)
    a, b, _, d = directory_of(data)
    data = damage(data, a, 100, bytes([data[a.offset + 200] ^ 0xFF]))
    found, rejected, _ = read(data)
    assert rejected == {a.name: "its CRC-32 does not match"}
    assert set(found) == set(FILES) - {a.name}

    deflated = make_zip()
    a, b, _, d = directory_of(deflated)
    broken = damage(deflated, b, 0, b"\xff\xff\xff")
    found, rejected, _ = read(broken)
    assert set(rejected) == {b.name} and "inflate" in rejected[b.name]
    assert found[d.name] == FILES[d.name]

    renamed = deflated.replace(b"asset_a.png", b"asset_x.png", 1)  # the local header only
    assert read(renamed)[1] == {a.name: "its local header names another file"}


def test_an_entry_that_holds_more_or_less_than_it_states_is_rejected() -> None:
    data = make_zip(method=zipfile.ZIP_DEFLATED, streamed=False)
    entries = directory_of(data)
    directory = zipstream.find_directory(data[-zipstream.TAIL :], len(data))
    listing = bytearray(data[directory.offset : directory.offset + directory.length])
    struct.pack_into("<L", listing, 24, entries[0].size - 1)  # its size, in the directory
    lying = zipstream.parse_directory(bytes(listing), directory)
    found, rejected, reader = collecting(lying, 0)
    trio.run(reader, data[: directory.offset])
    assert rejected == {
        entries[0].name: f"it holds more than the {entries[0].size - 1:,} bytes it states"
    }
    assert set(found) == set(FILES) - {entries[0].name}


def test_entries_not_reached_are_pending_and_encrypted_ones_rejected() -> None:
    data = make_zip()
    entries = directory_of(data)
    got: list[str] = []

    async def on_found(entry: zipstream.Entry, body: bytes) -> None:
        got.append(entry.name)

    async def on_rejected(entry: zipstream.Entry, reason: str) -> None:
        got.append(f"{entry.name}: {reason}")

    encrypted = dataclasses.replace(entries[0], flags=entries[0].flags | 0x1)
    reader = zipstream.EntryReader([encrypted, *entries[1:]], 0, on_found, on_rejected)
    trio.run(reader, data[: entries[2].offset + 10])  # the transfer stops inside the third
    assert got == [f"{entries[0].name}: it is encrypted", entries[1].name]
    assert [e.name for e in reader.pending] == [e.name for e in entries[2:]]

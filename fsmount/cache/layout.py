"""What a cache directory holds, named once for the mount and for `fsmount cache`.

    <cache dir>/blocks/             the BlockStore: block files and its instance locks
    <cache dir>/metadata.sqlite     the MetadataStore (SQLite adds -wal and -shm beside it)

`fsmount cache clear` empties `blocks/` and keeps the metadata: sizes and first-seen times are
what keep `ls -l` free of requests and file times stable across remounts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_SQLITE_SUFFIXES = ("", "-wal", "-shm")  # the database, its write-ahead log, its shared memory


@dataclass(frozen=True, slots=True)
class CacheLayout:
    directory: Path

    @property
    def blocks(self) -> Path:
        return self.directory / "blocks"

    @property
    def metadata(self) -> Path:
        return self.directory / "metadata.sqlite"

    def metadata_files(self) -> list[Path]:
        """The metadata database and the files SQLite keeps beside it, present or not."""
        return [Path(f"{self.metadata}{suffix}") for suffix in _SQLITE_SUFFIXES]

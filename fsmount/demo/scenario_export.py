"""The fake Scenario's batch export: jobs that ripen over time, and the zips they produce.

scenario-api.md §4 and the SDK's docstrings are followed where they speak: `fileNameTemplate`
tokens (`<seed> <num> <prompt> <generator> <id> <description>`, a later occurrence of a token
dropped with the separator before it, `/` for sub-folders, names capped at 128 characters and
folder segments at 64), `flat`, the job statuses. Where they are silent the fake picks what a
streaming zip writer on a server would do, which is also what catches a careless reader: every
entry deflated, with its sizes and CRC after the data (flag bit 3, data descriptors), so only
the central directory at the end of the archive says where an entry ends.
"""

from __future__ import annotations

import io
import re
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fsmount.demo.scenario_samples import SampleAsset, ScenarioSamples

STATUSES = ("pending", "queued", "warming-up", "in-progress", "finalizing")
OUTCOMES = ("success", "failure", "canceled")
TOKENS = ("seed", "num", "prompt", "generator", "id", "description")
NAME_CAP, SEGMENT_CAP = 128, 64
_FUNCTION_WORDS = frozenset(
    ("a", "an", "and", "at", "by", "for", "from", "in", "into", "of", "on", "or", "the", "to")
)

Entries = list[tuple[str, bytes]]
EntriesHook = Callable[[Entries], Entries]
"""Changes a job's entries before they are zipped: lets a test add a stray entry, or cut one."""


@dataclass
class ExportJob:
    """One batch download job. Its status follows the clock: one step of STATUSES every
    `step` seconds, then its `outcome`; its zip is built once, when first asked for."""

    id: str
    assets: list[SampleAsset]
    names: list[str]
    archive: str
    outcome: str
    step: float
    hook: EntriesHook | None
    created: float = field(default_factory=time.monotonic)
    _zip: bytes | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self) -> str:
        steps = int((time.monotonic() - self.created) / self.step) if self.step > 0 else 99
        return STATUSES[steps] if steps < len(STATUSES) else self.outcome

    def zip(self) -> bytes:
        """The archive, built on first use and kept (call it in a worker thread)."""
        with self._lock:
            if self._zip is None:
                entries = [
                    (name, asset.original())
                    for name, asset in zip(self.names, self.assets, strict=True)
                ]
                self._zip = streamed_zip(self.hook(entries) if self.hook else entries)
            return self._zip


class Unseekable(io.RawIOBase):
    """An output zipfile cannot seek back in: it then writes data descriptors, as a server
    streaming an archive to its client (or to object storage) does."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.data += data
        return len(data)


def streamed_zip(entries: Sequence[tuple[str, bytes]]) -> bytes:
    out = Unseekable()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return bytes(out.data)


def slug(text: str | None) -> str:
    """The SDK's prompt slug: lower-cased, function words removed, at most 8 words, `_`-joined."""
    words = re.findall(r"[a-z0-9]+", (text or "").lower())
    return "_".join([w for w in words if w not in _FUNCTION_WORDS][:8])


def entry_names(
    samples: ScenarioSamples, assets: Sequence[SampleAsset], template: str, *, flat: bool
) -> list[str]:
    """Each asset's name in the zip: the template rendered, capped, with the stored format's
    extension; `flat` keeps only the last segment; a name taken twice gets `_2`, `_3`..."""
    taken: dict[str, int] = {}
    names = []
    for asset in assets:
        segments = [s for s in _render(samples, asset, template).split("/") if s] or [asset.id]
        if flat:
            segments = segments[-1:]
        ext = f".{asset.native_ext}"
        stem = segments[-1][: NAME_CAP - len(ext) - 4]  # room for a `_NNN` de-duplication
        path = "/".join([s[:SEGMENT_CAP] for s in segments[:-1]] + [stem])
        taken[path] = taken.get(path, 0) + 1
        names.append(f"{path}_{taken[path]}{ext}" if taken[path] > 1 else f"{path}{ext}")
    return names


def _render(samples: ScenarioSamples, asset: SampleAsset, template: str) -> str:
    model = samples.model(asset.model_id) if asset.model_id else None
    siblings = [a.id for a in samples.assets if a.inference_id == asset.inference_id]
    values = {
        "id": asset.id,
        "seed": str(asset.created_ms % 100_000) if asset.model_id else "",
        "num": str(siblings.index(asset.id) + 1) if asset.inference_id else "",
        "prompt": slug(asset.prompt),
        "generator": (model.name or model.id) if model else "",
        "description": "",  # the samples carry no description or caption
    }
    seen: set[str] = set()

    def token(match: re.Match[str]) -> str:
        name = match.group(2)
        if name in seen:  # a later occurrence goes, with the separator before it
            return ""
        seen.add(name)
        return match.group(1) + values[name].replace("/", "_")

    pattern = r"([^<>]?)<(" + "|".join(TOKENS) + r")>"
    return re.sub(pattern, token, template)

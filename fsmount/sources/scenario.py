"""Scenario assets as tree nodes: one virtual file per format an asset can be downloaded in.

Reading a file asks the API for a signed URL for that format (`POST /assets/{id}/download`);
the transfer layer reuses it until shortly before it expires. The native file's size and time
come from the listing; converted formats' sizes are learned from the CDN.

Native files can also come many at a time, through batch export jobs (`POST /assets/download`,
scenario-api.md §4): what a job costs (a dry run), starting one, its status, and its zip as a
Blob whose URL is the job's `downloadUrl`. `fsmount/export.py` drives them.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fsmount.blob import Blob, RemoteBlob, SignedUrl
from fsmount.config import Config, scenario_credentials_source
from fsmount.errors import FetchError
from fsmount.sources.base import Connect, signed_url, source_xattrs, startup_get
from fsmount.transfer import ApiClient
from fsmount.tree import (
    Directory,
    File,
    ListedDirectory,
    Node,
    TreeContext,
    safe_name,
    unique_names,
)

log = logging.getLogger(__name__)

ROOT = "scenario"
PAGE = 100  # the API's maximum page size
EXPORT_LIMIT = 1000  # assets per batch export job
# Entries named `<asset-id>.<ext>`, with no folders: each is matched back to its asset by id.
EXPORT_OPTIONS = {"fileNameTemplate": "<id>", "flat": True, "preferOriginal": False}
DRY_RUN_STATUS = 269  # a dry run's answer; anything else may mean a job was started
EXPORT_SUCCEEDED = "success"
EXPORT_FAILED = frozenset({"failure", "canceled"})
FORMATS_BY_KIND = {
    "image": ("png", "jpg", "webp", "avif", "tif", "gif", "heif"),
    "3d": ("glb", "fbx", "obj"),
}
NATIVE_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/avif": "avif",
    "image/tiff": "tif",
    "image/svg+xml": "svg",
    "image/heic": "heic",
    "image/heif": "heif",
    "model/gltf-binary": "glb",
    "model/glb": "glb",
    "model/gltf+json": "gltf",
    "model/obj": "obj",
    "model/x-fbx": "fbx",
    "application/vnd.autodesk.fbx": "fbx",
    "model/stl": "stl",
    "model/ply": "ply",
    "model/spz": "spz",
    "video/mp4": "mp4",
    "video/webm": "webm",
    "audio/mpeg": "mp3",
    "audio/wav": "wav",
    "text/plain": "txt",
    "application/json": "json",
}


def _timestamp(text: Any) -> float | None:
    """An ISO 8601 time as seconds since the epoch; one written without a zone is UTC, as the
    API's times are (a naive datetime would be read as local time)."""
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _blob_key(asset_id: str, target: str | None) -> str:
    return f"{ROOT}:{asset_id}:{target or 'native'}"


def native_asset(blob: Blob | None) -> str | None:
    """The asset whose native file `blob` is (what a batch export holds); None for a converted
    format or anything not from Scenario."""
    if not isinstance(blob, RemoteBlob):
        return None
    asset_id = blob.key.removeprefix(f"{ROOT}:").removesuffix(":native")
    return asset_id if blob.key == _blob_key(asset_id, None) else None


def is_visible(asset: dict[str, Any]) -> bool:
    """Only finished, unhidden, undeleted assets appear anywhere in the tree."""
    return (
        asset.get("status") == "success"
        and not asset.get("isHidden")
        and not asset.get("deletedAt")
    )


def from_config(cfg: Config, connect: Connect, ctx: TreeContext) -> Scenario | None:
    """The Scenario project of the configuration, if it has credentials (HTTP Basic)."""
    credentials = scenario_credentials_source(cfg)
    if credentials is None:
        return None

    def basic() -> dict[str, str]:
        key, secret = credentials()
        raw = base64.b64encode(f"{key}:{secret}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}

    return Scenario(connect(cfg.scenario_url, basic, "scenario"), ctx, project=cfg.scenario_project)


class Scenario:
    """One Scenario project, shown as `scenario/{assets,collections,models}/...`."""

    def __init__(self, api: ApiClient, ctx: TreeContext, *, project: str | None = None) -> None:
        self._api = api
        self._ctx = ctx
        self._project = project
        self._all_assets: list[dict[str, Any]] = []
        self._all_loaded_at = float("-inf")

    def _params(self, **extra: Any) -> dict[str, Any]:
        params = {k: v for k, v in extra.items() if v is not None}
        if self._project:
            params["projectId"] = self._project
        return params

    async def check(self) -> None:
        """Fail before mounting on wrong credentials or an unreachable API."""
        await startup_get(self._api, "Scenario", "assets", self._params(pageSize=1))

    def directory(self) -> Directory:
        xattrs = source_xattrs("scenario", self._api)
        if self._project:
            xattrs["project"] = self._project

        def sub(name: str, loader: Callable[[Directory], Any]) -> Directory:
            return ListedDirectory(
                name, self._ctx, loader=loader, xattrs={**xattrs, "listing": name}
            )

        children = [
            sub("assets", self._load_assets),
            sub("collections", self._load_collections),
            sub("models", self._load_models),
        ]
        return Directory(ROOT, self._ctx, children=children, xattrs=xattrs)

    async def _paged(self, path: str, envelope: str, **params: Any) -> list[dict[str, Any]]:
        """Every record of a token-paginated listing (stops on a missing token or empty page)."""
        records: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = await self._api.get_json(
                path, self._params(pageSize=PAGE, paginationToken=token, **params)
            )
            batch = [r for r in page.get(envelope) or [] if isinstance(r, dict)]
            records += batch
            token = page.get("nextPaginationToken")
            if not token or not batch:
                return records

    async def _visible_assets(self, **filters: Any) -> list[dict[str, Any]]:
        assets = await self._paged(
            "assets", "assets", sortBy="createdAt", sortDirection="desc", **filters
        )
        return [a for a in assets if isinstance(a.get("id"), str) and is_visible(a)]

    async def _everything(self) -> list[dict[str, Any]]:
        """The project's whole listing, shared by `assets/` and `models/` within the TTL."""
        if time.monotonic() - self._all_loaded_at >= self._ctx.listing_ttl:
            self._all_assets = await self._visible_assets()
            self._all_loaded_at = time.monotonic()
        return self._all_assets

    async def _load_assets(self, parent: Directory) -> list[Node]:
        return self._files(parent.path, await self._everything())

    async def _load_collections(self, parent: Directory) -> list[Node]:
        collections = await self._paged("collections", "collections")
        collections = [c for c in collections if isinstance(c.get("id"), str)]
        names = unique_names(
            [(safe_name(str(c.get("name") or c["id"]), c["id"]), c["id"]) for c in collections]
        )
        return [
            ListedDirectory(
                name,
                self._ctx,
                loader=self._collection_loader(c["id"]),
                xattrs={"collection": c["id"]},
            )
            for name, c in zip(names, collections, strict=True)
        ]

    def _collection_loader(self, collection_id: str) -> Callable[[Directory], Any]:
        async def load(parent: Directory) -> list[Node]:
            assets = await self._visible_assets(collectionId=collection_id)
            return self._files(parent.path, assets)

        return load

    async def _load_models(self, parent: Directory) -> list[Node]:
        assets = await self._everything()
        model_ids = sorted({a["metadata"]["modelId"] for a in assets if _model_id(a) is not None})
        found: dict[str, str] = {}
        for start in range(0, len(model_ids), PAGE):
            reply = await self._api.post_json(
                "models/get-bulk",
                {"modelIds": model_ids[start : start + PAGE], "minimal": True},
                self._params(),
            )
            for model in reply.get("models") or []:
                if isinstance(model, dict) and isinstance(model.get("name"), str):
                    found[str(model.get("id"))] = model["name"]
        pairs = [(safe_name(found.get(m) or m, m), m) for m in model_ids]
        nodes: list[Node] = []
        for name, model_id in zip(unique_names(pairs), model_ids, strict=True):
            own = [a for a in assets if _model_id(a) == model_id]
            children = self._files(f"{parent.path}/{name}", own)
            nodes.append(Directory(name, self._ctx, children=children, xattrs={"model": model_id}))
        return nodes

    def _files(self, directory: str, assets: list[dict[str, Any]]) -> list[Node]:
        nodes: list[Node] = []
        for asset in assets:
            try:
                nodes += self._asset_files(directory, asset)
            except (KeyError, TypeError, ValueError, AttributeError):
                log.warning("%s: skipping a malformed asset: %.200r", directory, asset)
        return nodes

    def _asset_files(self, directory: str, asset: dict[str, Any]) -> list[Node]:
        asset_id = asset["id"]
        kind = str(asset.get("kind") or asset.get("metadata", {}).get("kind") or "")
        native = NATIVE_EXTENSIONS.get(str(asset.get("mimeType", "")).lower())
        if native is None:
            log.warning("%s: asset %s has an unknown mime type", directory, asset_id)
            native = "bin"
        updated = str(asset.get("updatedAt", ""))
        mtime = _timestamp(updated)
        metadata = asset.get("metadata") or {}
        xattrs = {
            "asset": asset_id,
            "kind": kind,
            "prompt": str(metadata.get("prompt") or ""),
            "model": str(metadata.get("modelId") or ""),
        }
        size = asset.get("properties", {}).get("size")
        formats = [(native, None)] + [
            (fmt, fmt) for fmt in FORMATS_BY_KIND.get(kind, ()) if fmt != native
        ]
        nodes: list[Node] = []
        for ext, target in formats:
            name = safe_name(f"{asset_id}.{ext}", f"{asset_id}.{ext}")
            blob = RemoteBlob(
                key=_blob_key(asset_id, target),
                resolve=self._resolver(asset_id, target),
                description=f"scenario {asset_id}.{ext}",
                size=int(size) if target is None and isinstance(size, int | float) else None,
                mtime=mtime,
                version=f"{updated}:{target or 'native'}",
                xattrs={**xattrs, "format": ext},
                costly_probe=target is not None,  # the CDN converts on the first request
            )
            nodes.append(File(name, blob, mtime=mtime))
        return nodes

    # -- batch export -------------------------------------------------------------------------

    def _export_body(self, asset_ids: list[str]) -> dict[str, Any]:
        return {
            "options": EXPORT_OPTIONS,
            "query": {"assetIds": asset_ids, "inferenceIds": [], "modelIds": []},
        }

    async def export_cost(self, asset_ids: list[str]) -> float:
        """What exporting these assets would cost, in creative units, from a dry run.

        Anything but the dry run's HTTP 269 is an error: an API that ignored `dryRun` would
        have started (and charged for) a job.
        """
        response = await self._api.request(
            "POST",
            "assets/download",
            params=self._params(dryRun="true"),
            json_body=self._export_body(asset_ids),
        )
        try:
            reply = response.json()
        except ValueError:
            reply = None
        cost = reply.get("creativeUnitsCost") if isinstance(reply, dict) else None
        if response.status_code != DRY_RUN_STATUS or not isinstance(cost, int | float):
            raise FetchError.eio(
                f"scenario: the export's dry run answered HTTP {response.status_code}"
                " without a cost: no job was started on purpose"
            )
        return cost

    async def start_export(self, asset_ids: list[str]) -> str:
        """Start an export job of at most EXPORT_LIMIT assets; its id."""
        reply = await self._api.post_json(
            "assets/download", self._export_body(asset_ids), self._params()
        )
        job_id = reply.get("jobId") if isinstance(reply, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise FetchError.eio("scenario: the export request answered no jobId")
        return job_id

    async def export_status(self, job_id: str) -> tuple[str, str | None]:
        """The job's status and, once it has succeeded, the signed URL of its zip."""
        reply = await self._api.get_json(f"assets/download/{job_id}", self._params())
        status = reply.get("jobStatus") if isinstance(reply, dict) else None
        url = reply.get("downloadUrl") if isinstance(reply, dict) else None
        return str(status), url if isinstance(url, str) and url else None

    def export_blob(self, job_id: str, url: str) -> RemoteBlob:
        """The zip of a finished job, first at `url` (its `downloadUrl`); a new link is asked
        for (a status request) when that one has expired or is refused."""
        given = [url]

        async def resolve() -> SignedUrl:
            link = given.pop() if given else (await self.export_status(job_id))[1]
            if link is None:
                raise FetchError.eio(f"scenario export {job_id}: the job has no download link")
            return signed_url(link)

        return RemoteBlob(
            key=f"{ROOT}-export:{job_id}", resolve=resolve, description=f"scenario export {job_id}"
        )

    def _resolver(self, asset_id: str, target: str | None) -> Callable[[], Any]:
        async def resolve() -> SignedUrl:
            body = {"targetFormat": target} if target else {}
            reply = await self._api.post_json(f"assets/{asset_id}/download", body, self._params())
            return signed_url(reply["url"])

        return resolve


def _model_id(asset: dict[str, Any]) -> str | None:
    model = (asset.get("metadata") or {}).get("modelId")
    return model if isinstance(model, str) and model else None

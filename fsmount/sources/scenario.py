"""Scenario assets as tree nodes: one virtual file per format an asset can be downloaded in.

Reading a file asks the API for a signed URL for that format (`POST /assets/{id}/download`);
the transfer layer reuses it until shortly before it expires. The native file's size and time
come from the listing; converted formats' sizes are learned from the CDN.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fsmount.blob import RemoteBlob, SignedUrl
from fsmount.errors import FetchError, StartupError
from fsmount.transfer import ApiClient, redact, url_expiry
from fsmount.tree import Directory, File, Node, TreeContext, safe_name, unique_names

log = logging.getLogger(__name__)

ROOT = "scenario"
PAGE = 100  # the API's maximum page size
STARTUP_DEADLINE = 10.0
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


def is_visible(asset: dict[str, Any]) -> bool:
    """Only finished, unhidden, undeleted assets appear anywhere in the tree."""
    return (
        asset.get("status") == "success"
        and not asset.get("isHidden")
        and not asset.get("deletedAt")
    )


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
        try:
            await self._api.get_json("assets", self._params(pageSize=1), deadline=STARTUP_DEADLINE)
        except FetchError as exc:
            raise StartupError(f"cannot use the Scenario API: {exc}") from None

    def directory(self) -> Directory:
        xattrs = {"source": "scenario", "api": redact(self._api.base_url)}
        if self._project:
            xattrs["project"] = self._project

        def sub(name: str, loader: Callable[[Directory], Any]) -> Directory:
            return Directory(
                name, f"{ROOT}/{name}", self._ctx, loader=loader, xattrs={**xattrs, "listing": name}
            )

        children = [
            sub("assets", self._load_assets),
            sub("collections", self._load_collections),
            sub("models", self._load_models),
        ]
        return Directory(ROOT, ROOT, self._ctx, children=children, xattrs=xattrs)

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
            Directory(
                name,
                parent.child_path(name),
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
            path = parent.child_path(name)
            children = self._files(path, own)
            nodes.append(
                Directory(name, path, self._ctx, children=children, xattrs={"model": model_id})
            )
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
                key=f"scenario:{asset_id}:{target or 'native'}",
                resolve=self._resolver(asset_id, target),
                description=f"scenario {asset_id}.{ext}",
                size=int(size) if target is None and isinstance(size, int | float) else None,
                mtime=mtime,
                version=f"{updated}:{target or 'native'}",
                xattrs={**xattrs, "format": ext},
            )
            nodes.append(File(name, f"{directory}/{name}", mtime=mtime, blob=blob))
        return nodes

    def _resolver(self, asset_id: str, target: str | None) -> Callable[[], Any]:
        async def resolve() -> SignedUrl:
            body = {"targetFormat": target} if target else {}
            reply = await self._api.post_json(f"assets/{asset_id}/download", body, self._params())
            url = reply["url"]
            return SignedUrl(url, url_expiry(url))

        return resolve


def _model_id(asset: dict[str, Any]) -> str | None:
    model = (asset.get("metadata") or {}).get("modelId")
    return model if isinstance(model, str) and model else None

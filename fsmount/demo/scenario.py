"""A fake Scenario: the REST API under `/v1` and, on a second origin, its signed CDN.

It follows /work/shared/reference/scenario-api.md field by field, because fsmount and the
official `scenario-sdk` are both tested against it: Basic auth with key and secret, `{"reason"}`
error bodies, opaque base64 pagination tokens, `{"asset": ...}` envelopes, the download endpoint
with `targetFormat`, and a CDN that behaves like CloudFront (custom-policy signatures, 403 XML
when expired or altered, no `Authorization`, ranges, an optional redirect first).

Where the reference leaves a choice open, the fake takes the one that catches careless clients:
listings include pending, failed, hidden and deleted assets (each marked as such); a listing's
`url` points at the CDN transform, which re-encodes, so only a download without `targetFormat`
(or `originalAssets=true`) yields the original bytes; the CDN serves 3D files as
`application/octet-stream`, so only the API's `mimeType` tells what a file is. Sample content
lives in `scenario_samples`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import itertools
import json
import math
import re
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from fsmount.demo.httpcommon import (
    FakeService,
    FaultInjector,
    InjectedCut,
    RequestLog,
    RunningServer,
    TlsFiles,
    UrlSigner,
    access_denied,
    json_response,
    range_response,
    start_server,
)
from fsmount.demo.scenario_export import OUTCOMES, EntriesHook, ExportJob, entry_names
from fsmount.demo.scenario_samples import (
    FORMAT_ALIASES,
    FORMAT_MIME,
    TARGET_FORMATS,
    ExpectedFile,
    SampleAsset,
    ScenarioSamples,
    accepted_formats,
    fake_id,
)

DEMO_KEY = "demo-key-" + hashlib.sha256(b"fsmount demo: scenario key").hexdigest()[:24]
DEMO_SECRET = "demo-secret-" + hashlib.sha256(b"fsmount demo: scenario secret").hexdigest()
KEY_PAIR_ID = "K2SCNDEMO7Q4ZD"
DEFAULT_URL_EXPIRY = 24 * 3600.0  # the shortest lifetime real Scenario CDN URLs have
# (default, maximum) pageSize per listing, from the SDK's parameter docs
ASSET_PAGE, COLLECTION_PAGE, MODEL_PAGE = (50, 100), (10, 100), (100, 500)
REQUEST_KINDS = (
    "assets",
    "asset",
    "download",
    "collections",
    "models",
    "models-bulk",
    "cdn",
    "export",  # POST /assets/download: a batch download job, or its dry run
    "export-status",  # GET /assets/download/{jobId}
    "export-zip",  # the job's zip, on the CDN
)
EXPORT_LIMIT = 1000  # assets per batch download job, as the SDK documents
DRY_RUN_STATUS = 269  # the answer to `dryRun`, which the SDK counts as a success
_SIGNATURE_PARAMS = frozenset({"Policy", "Signature", "Key-Pair-Id"})
_CDN_PATH = re.compile(r"/(assets|assets-transform)/(asset_[1-9A-HJ-NP-Za-km-z]+)")
_EXPORT_PATH = re.compile(r"/exports/(job_[1-9A-HJ-NP-Za-km-z]+)/[^/]+\.zip")

_Row = TypeVar("_Row")
_Handler = Callable[[Request], Awaitable[Response]]


class _Refusal(Exception):
    """Raised anywhere in an API handler to answer with a `{"reason": ...}` error at once."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _xml_error(status: int, code: str, message: str) -> Response:
    """S3/CloudFront-style error document, for CDN refusals other than signature ones."""
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"  # noqa: E501
    return Response(body.encode(), status, media_type="application/xml")


def _encode_token(last_key: str) -> str:
    """DynamoDB-style cursor as the real API's tokens look: base64 of `{"lastKey": ...}`."""
    return base64.b64encode(json.dumps({"lastKey": last_key}).encode()).decode()


def _resume_after(token: str, keys: Sequence[str]) -> int:
    """Index of the first row after the token's key; 400 for a token this listing never issued."""
    try:
        last_key = json.loads(base64.b64decode(token, validate=True))["lastKey"]
        return keys.index(last_key) + 1
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise _Refusal(400, "Invalid pagination token") from None


def _flag(request: Request, name: str) -> bool:
    """A boolean query parameter, sent as `true` / `false` by the SDK."""
    value = request.query_params.get(name, "false")
    if value not in ("true", "false"):
        raise _Refusal(400, f"{name} must be true or false")
    return value == "true"


class ScenarioFake(FakeService):
    """Both servers of the fake (API and CDN) and the knobs tests turn.

    One `log` records both servers under the kinds in `REQUEST_KINDS` (plus "unknown" for any
    other API path). Knobs are plain attributes read on every request, so setting them from a
    test thread takes effect at once: `url_expiry` (seconds a newly signed URL stays valid),
    `redirect_first_hit` (the CDN answers the first request of each URL with a 302 to another
    signed URL) and `cdn_hold` (seconds each CDN request is held, in flight, before it is
    answered: overlapping requests then show in `log.peak_in_flight("cdn")`).

    Batch export knobs (`reset_export` puts them back), read when a job is created or its zip
    served: `export_unit_cost` (creative units per asset; a dry run answers the total, rounded
    up), `export_limit` (assets per job), `export_step` (seconds per status before the
    outcome), `export_outcome` ("success", "failure" or "canceled"), `export_hook` (changes a
    job's entries before they are zipped) and `export_cut_at` (a fraction of the zip: every
    transfer of it that reaches that point drops the connection there).
    """

    def __init__(self, *, tls: TlsFiles | None = None) -> None:
        self.samples = ScenarioSamples()
        self.key = DEMO_KEY
        self.secret = DEMO_SECRET
        self.project_id = self.samples.project_id
        self.log = RequestLog()
        self.url_expiry = DEFAULT_URL_EXPIRY
        self.redirect_first_hit = False
        self.cdn_hold = 0.0
        self.reset_export()
        self._jobs: dict[str, ExportJob] = {}
        self._job_ids = itertools.count(1)
        self.ca_file: Path | None = tls.ca_file if tls else None
        self._signer = UrlSigner(hashlib.sha256(DEMO_SECRET.encode()).digest(), KEY_PAIR_ID)
        self._lock = threading.Lock()
        self._hit_urls: set[str] = set()
        self._hops = itertools.count(1)
        self._traces = itertools.count(1)
        self.api_faults = FaultInjector(self._api_app(), seed=3)
        self.cdn_faults = FaultInjector(self._cdn_app(), seed=4)
        self._cdn: RunningServer = start_server(self.cdn_faults, tls=tls)
        try:
            self._api: RunningServer = start_server(self.api_faults, tls=tls)
        except BaseException:
            self._cdn.stop()
            raise
        self._servers = (self._api, self._cdn)
        self._injectors = (self.api_faults, self.cdn_faults)
        self.cdn_url = self._cdn.url
        self.api_url = self._api.url + "/v1"

    # ----------------------------------------------------------------- public API for tests

    def expected_tree(self) -> dict[str, ExpectedFile]:
        """Every file fsmount must show under `scenario/` (relative path → expected file)."""
        return self.samples.expected_tree()

    def expected_dirs(self) -> set[str]:
        """Every directory fsmount must show under `scenario/`, relative to it."""
        return self.samples.expected_dirs()

    def reset_export(self) -> None:
        """The export knobs back to a well-behaved service that charges for exports."""
        self.export_unit_cost = 0.5
        self.export_limit = EXPORT_LIMIT
        self.export_step = 0.05
        self.export_outcome = "success"
        self.export_hook: EntriesHook | None = None
        self.export_cut_at: float | None = None

    def visible_asset_ids(self) -> set[str]:
        """Ids of the assets a correct client shows (status success, not hidden, not deleted)."""
        return {asset.id for asset in self.samples.assets if asset.visible}

    # ----------------------------------------------------------------- API plumbing

    def _api_app(self) -> Starlette:
        routes = [
            Route("/v1/assets", self._endpoint("assets", self._list_assets)),
            Route(
                "/v1/assets/download",
                self._endpoint("export", self._request_export),
                methods=["POST"],
            ),
            Route(
                "/v1/assets/download/{job_id}",
                self._endpoint("export-status", self._export_status),
            ),
            Route("/v1/assets/{asset_id}", self._endpoint("asset", self._get_asset)),
            Route(
                "/v1/assets/{asset_id}/download",
                self._endpoint("download", self._download),
                methods=["POST"],
            ),
            Route("/v1/collections", self._endpoint("collections", self._list_collections)),
            Route("/v1/models", self._endpoint("models", self._list_models)),
            Route(
                "/v1/models/get-bulk",
                self._endpoint("models-bulk", self._get_models_bulk),
                methods=["POST"],
            ),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: self._no_route})

    async def _no_route(self, request: Request, exc: Exception) -> Response:
        """Unknown paths and methods still answer in the API's JSON error style, and are logged."""
        self.log.record("unknown", request)
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        return self._error(status, "Not Found" if status == 404 else "Method Not Allowed")

    def _error(self, status: int, reason: str) -> Response:
        trace = f"1-{int(time.time()):08x}-{next(self._traces):024x}"
        return json_response({"reason": reason, "traceId": trace}, status)

    def _endpoint(self, kind: str, handler: _Handler) -> _Handler:
        """Wrap a handler with what every endpoint does: log, authenticate, check `projectId`."""

        async def endpoint(request: Request) -> Response:
            self.log.record(kind, request)
            try:
                self._authenticate(request)
                project = request.query_params.get("projectId")
                if project is not None and project != self.project_id:
                    raise _Refusal(403, "Forbidden")
                return await handler(request)
            except _Refusal as refusal:
                return self._error(refusal.status, refusal.reason)

        return endpoint

    def _authenticate(self, request: Request) -> None:
        """HTTP Basic with the key as user and the secret as password; anything else is 401."""
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        valid = hmac.compare_digest(user.encode(), self.key.encode()) & hmac.compare_digest(
            password.encode(), self.secret.encode()
        )
        if scheme.lower() != "basic" or not valid:
            raise _Refusal(401, "Unauthorized")

    @staticmethod
    def _page(
        request: Request, rows: Sequence[_Row], key: Callable[[_Row], str], sizes: tuple[int, int]
    ) -> tuple[Sequence[_Row], str | None]:
        """One page of `rows` and the token of the next one (None on the last page)."""
        default, maximum = sizes
        try:
            size = int(request.query_params.get("pageSize", default))
        except ValueError:
            raise _Refusal(400, "pageSize must be an integer") from None
        if not 1 <= size <= maximum:
            raise _Refusal(400, f"pageSize must be between 1 and {maximum}")
        token = request.query_params.get("paginationToken")
        start = 0 if token is None else _resume_after(token, [key(row) for row in rows])
        page = rows[start : start + size]
        more = start + size < len(rows)
        return page, _encode_token(key(page[-1])) if more else None

    @staticmethod
    def _sorted(
        request: Request,
        rows: list[_Row],
        stamps: dict[str, Callable[[_Row], int]],
        key: Callable[[_Row], str],
    ) -> list[_Row]:
        """Order rows by `sortBy` (first stamp by default) and `sortDirection` (desc by default)."""
        sort_by = request.query_params.get("sortBy", next(iter(stamps)))
        direction = request.query_params.get("sortDirection", "desc")
        if sort_by not in stamps or direction not in ("asc", "desc"):
            raise _Refusal(400, "Invalid sortBy or sortDirection")
        stamp = stamps[sort_by]
        return sorted(rows, key=lambda row: (stamp(row), key(row)), reverse=direction == "desc")

    # ----------------------------------------------------------------- signed URLs

    def _sign(self, path_and_query: str) -> str:
        """A CloudFront custom-policy URL on the CDN; the policy's resource ends in `*`."""
        expires = time.time() + self.url_expiry
        return self._signer.custom(self.cdn_url + path_and_query, expires)

    def _original_url(self, asset: SampleAsset) -> str:
        return self._sign(f"/assets/{asset.id}?p=100")

    def _transform_url(self, asset: SampleAsset, fmt: str | None = None) -> str:
        return self._sign(f"/assets-transform/{asset.id}?p=100" + (f"&format={fmt}" if fmt else ""))

    # ----------------------------------------------------------------- API endpoints

    async def _list_assets(self, request: Request) -> Response:
        query = request.query_params
        if "type" in query and "types" in query:
            raise _Refusal(400, "type and types cannot be used together")
        original = _flag(request, "originalAssets")
        deleted = _flag(request, "deleted")
        kinds = set(query.get("types", query.get("type", "")).split(",")) - {""}
        rows = [
            asset
            for asset in self.samples.assets
            if ("collectionId" not in query or query["collectionId"] in asset.collection_ids)
            and query.get("modelId", asset.model_id) == asset.model_id
            and query.get("inferenceId", asset.inference_id) == asset.inference_id
            and query.get("authorId", self.samples.author_id) == self.samples.author_id
            and (not kinds or asset.origin in kinds)
            and (not deleted or asset.deleted_ms is not None)
        ]
        stamps: dict[str, Callable[[SampleAsset], int]] = {
            "createdAt": lambda a: a.created_ms,
            "updatedAt": lambda a: a.updated_ms,
        }
        rows = self._sorted(request, rows, stamps, lambda a: a.id)
        page, token = self._page(request, rows, lambda a: a.id, ASSET_PAGE)
        url = self._original_url if original else self._transform_url
        body: dict[str, Any] = {"assets": [self.samples.asset_json(a, url(a)) for a in page]}
        if token is not None:  # the last page has no token at all
            body["nextPaginationToken"] = token
        return json_response(body)

    def _asset(self, request: Request) -> SampleAsset:
        asset = self.samples.asset(request.path_params["asset_id"])
        if asset is None:
            raise _Refusal(404, "Asset not found")
        return asset

    async def _get_asset(self, request: Request) -> Response:
        asset = self._asset(request)
        url = self._original_url if _flag(request, "originalAssets") else self._transform_url
        return json_response({"asset": self.samples.asset_json(asset, url(asset))})

    async def _json_body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise _Refusal(400, "Invalid JSON body") from None
        if not isinstance(body, dict):
            raise _Refusal(400, "Invalid JSON body")
        return body

    async def _download(self, request: Request) -> Response:
        """A signed link to the original (no `targetFormat`) or to the CDN's conversion."""
        asset = self._asset(request)
        target = (await self._json_body(request)).get("targetFormat")
        if asset.status != "success":
            raise _Refusal(400, f"Asset is not downloadable while its status is {asset.status}")
        if target is None:
            return json_response({"url": self._original_url(asset), "mimeType": asset.mime_type})
        if target not in TARGET_FORMATS:
            raise _Refusal(400, f"Invalid targetFormat {target!r}")
        fmt = FORMAT_ALIASES.get(target, target)
        if fmt not in accepted_formats(asset.kind, asset.native_ext):
            raise _Refusal(
                400, f"Unsupported target format '{target}' for asset kind '{asset.kind}'"
            )
        if asset.kind in ("video", "audio"):  # "only accept their stored format": the original
            return json_response({"url": self._original_url(asset), "mimeType": asset.mime_type})
        return json_response({"url": self._transform_url(asset, fmt), "mimeType": FORMAT_MIME[fmt]})

    async def _list_collections(self, request: Request) -> Response:
        rows = self.samples.collections
        page, token = self._page(request, rows, lambda c: c.id, COLLECTION_PAGE)
        collections = [self.samples.collection_json(c) for c in page]
        # unlike /assets, the last page carries an explicit null: clients must accept both
        return json_response({"collections": collections, "nextPaginationToken": token})

    async def _list_models(self, request: Request) -> Response:
        """The project's own models (`privacy=private`, the default) or the public catalogue."""
        privacy = request.query_params.get("privacy", "private")
        status = request.query_params.get("status", "trained")
        if privacy not in ("private", "public"):
            raise _Refusal(400, "privacy must be private or public")
        rows = [m for m in self.samples.models if m.privacy == privacy and status == "trained"]
        stamps = {"createdAt": lambda m: m.created_ms, "updatedAt": lambda m: m.created_ms}
        rows = self._sorted(request, rows, stamps, lambda m: m.id)
        page, token = self._page(request, rows, lambda m: m.id, MODEL_PAGE)
        body: dict[str, Any] = {"models": [self.samples.model_json(m) for m in page]}
        if token is not None:
            body["nextPaginationToken"] = token
        return json_response(body)

    async def _get_models_bulk(self, request: Request) -> Response:
        """Models by id, in the order asked, unknown ids left out; `minimal` trims each record."""
        body = await self._json_body(request)
        ids = body.get("modelIds")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise _Refusal(400, "modelIds must be a list of model ids")
        minimal = body.get("minimal") is True
        models = [self.samples.model(i) for i in dict.fromkeys(ids)]
        found = [self.samples.model_json(m, minimal=minimal) for m in models if m is not None]
        return json_response({"models": found})

    # ----------------------------------------------------------------- batch export

    def _export_assets(self, query: Any) -> list[SampleAsset]:
        """The assets a job's `query` names (ids, and every visible asset of the inferences and
        models named), each once, in the order named; 400 for what cannot be exported."""
        if not isinstance(query, dict):
            raise _Refusal(400, "query is required")
        lists = {}
        for field in ("assetIds", "inferenceIds", "modelIds"):
            value = query.get(field)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _Refusal(400, f"query.{field} must be a list of ids")
            lists[field] = value
        if len(set(lists["assetIds"])) > self.export_limit:
            raise _Refusal(400, f"Batch download is limited to {self.export_limit} assets")
        chosen: dict[str, SampleAsset] = {}
        for asset_id in lists["assetIds"]:
            asset = self.samples.asset(asset_id)
            if asset is None or asset.deleted_ms is not None:
                raise _Refusal(400, f"Asset {asset_id} not found")
            if asset.status != "success":
                raise _Refusal(400, f"Asset {asset_id} is not downloadable")
            chosen[asset.id] = asset
        for asset in self.samples.assets:
            if asset.visible and (
                asset.inference_id in lists["inferenceIds"] or asset.model_id in lists["modelIds"]
            ):
                chosen.setdefault(asset.id, asset)
        if not chosen:
            raise _Refusal(400, "No asset to download")
        if len(chosen) > self.export_limit:
            raise _Refusal(400, f"Batch download is limited to {self.export_limit} assets")
        return list(chosen.values())

    async def _request_export(self, request: Request) -> Response:
        """A batch download job (`{"jobId"}`), or with `dryRun` its cost (HTTP 269)."""
        body = await self._json_body(request)
        options = body.get("options")
        template = options.get("fileNameTemplate") if isinstance(options, dict) else None
        if not isinstance(template, str) or not template.strip():
            raise _Refusal(400, "options.fileNameTemplate is required")
        assets = self._export_assets(body.get("query"))
        dry_run = request.query_params.get("dryRun")
        if dry_run is not None:
            if dry_run not in ("true", "api"):
                raise _Refusal(400, "dryRun must be true or api")
            cost = math.ceil(self.export_unit_cost * len(assets))
            return json_response({"creativeUnitsCost": cost}, DRY_RUN_STATUS)
        if self.export_outcome not in OUTCOMES:
            raise ValueError(f"export_outcome must be one of {OUTCOMES}")
        job_id = fake_id("job", f"export {next(self._job_ids)}")
        archive = str(options.get("archiveName") or time.strftime("%Y%m%d") + "-export")
        names = entry_names(self.samples, assets, template, flat=options.get("flat") is True)
        job = ExportJob(
            job_id,
            assets,
            names,
            archive,
            self.export_outcome,
            self.export_step,
            self.export_hook,
        )
        with self._lock:
            self._jobs[job_id] = job
        return json_response({"jobId": job_id})

    async def _export_status(self, request: Request) -> Response:
        """The job's status, and once it succeeded a freshly signed link to its zip."""
        with self._lock:
            job = self._jobs.get(request.path_params["job_id"])
        if job is None:
            raise _Refusal(404, "Job not found")
        status = job.status()
        body: dict[str, Any] = {"jobId": job.id, "jobStatus": status}
        if status == "success":
            body["downloadUrl"] = self._sign(f"/exports/{job.id}/{quote(job.archive)}.zip")
        return json_response(body)

    # ----------------------------------------------------------------- CDN

    def _cdn_app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/exports/{path:path}", self._export_zip_get, methods=["GET", "HEAD"]),
                Route("/{path:path}", self._cdn_get, methods=["GET", "HEAD"]),
            ]
        )

    def _redirect(self, request: Request) -> Response | None:
        """With `redirect_first_hit`, a 302 to a freshly signed URL the first time a URL is used."""
        target = request.url.path + "?" + request.url.query
        with self._lock:
            if not self.redirect_first_hit or target in self._hit_urls:
                return None
            self._hit_urls.add(target)
            hop = next(self._hops)
        kept = [(k, v) for k, v in request.query_params.multi_items() if k not in _SIGNATURE_PARAMS]
        location = self._sign(f"{request.url.path}?{urlencode([*kept, ('hop', hop)])}")
        with self._lock:
            self._hit_urls.add(location.removeprefix(self.cdn_url))
        return RedirectResponse(location, 302)

    async def _cdn_get(self, request: Request) -> Response:
        self.log.record("cdn", request)
        with self.log.in_flight("cdn"):
            if self.cdn_hold:
                await anyio.sleep(self.cdn_hold)
            return await self._cdn_answer(request)

    def _cdn_refusal(self, request: Request) -> Response | None:
        """What the CDN answers a request it will not serve: one with credentials, or without a
        valid, unexpired signature."""
        if "authorization" in request.headers:  # S3's answer to a second auth mechanism
            return _xml_error(
                400, "InvalidArgument", "Only one auth mechanism allowed; Authorization is not"
            )
        problem = self._signer.verify(str(request.url))
        return None if problem is None else access_denied(problem)

    async def _cdn_answer(self, request: Request) -> Response:
        refusal = self._cdn_refusal(request)
        if refusal is not None:
            return refusal
        match = _CDN_PATH.fullmatch(request.url.path)
        asset = self.samples.asset(match.group(2)) if match else None
        if match is None or asset is None:
            return _xml_error(404, "NoSuchKey", "The specified key does not exist.")
        redirect = self._redirect(request)
        if redirect is not None:
            return redirect
        original = match.group(1) == "assets"
        fmt = asset.native_ext if original else request.query_params.get("format", asset.native_ext)
        if fmt not in accepted_formats(asset.kind, asset.native_ext):
            return _xml_error(400, "InvalidArgument", f"Unsupported format {fmt}")
        produce = asset.original if original else functools.partial(asset.transformed, fmt)
        data = await anyio.to_thread.run_sync(produce)
        return range_response(
            request,
            size=len(data),
            read=lambda offset, length: data[offset : offset + length],
            etag=hashlib.md5(data).hexdigest(),
            last_modified=asset.mtime,
            content_type="application/octet-stream" if asset.kind == "3d" else FORMAT_MIME[fmt],
        )

    async def _export_zip_get(self, request: Request) -> Response:
        """A job's zip, with ranges; `export_cut_at` drops every transfer that reaches it."""
        self.log.record("export-zip", request)
        refusal = self._cdn_refusal(request)
        if refusal is not None:
            return refusal
        match = _EXPORT_PATH.fullmatch(request.url.path)
        with self._lock:
            job = self._jobs.get(match.group(1)) if match else None
        if job is None or job.status() != "success":
            return _xml_error(404, "NoSuchKey", "The specified key does not exist.")
        data = await anyio.to_thread.run_sync(job.zip)
        response = range_response(
            request,
            size=len(data),
            read=lambda offset, length: data[offset : offset + length],
            etag=hashlib.md5(data).hexdigest(),
            last_modified=time.time() // 3600 * 3600,
            content_type="application/zip",
        )
        if self.export_cut_at is not None and isinstance(response, StreamingResponse):
            first = response.headers.get("content-range", "bytes 0-").split()[1].split("-")[0]
            cut = int(len(data) * self.export_cut_at)
            if int(first) <= cut:  # a transfer that reaches the point drops there
                response.body_iterator = _cut_short(response.body_iterator, cut - int(first))
        return response


async def _cut_short(body: AsyncIterable[Any], keep: int) -> AsyncIterator[Any]:
    """The first `keep` bytes of a streamed body, then a dropped connection."""
    async for chunk in body:
        if len(chunk) >= keep:
            yield chunk[:keep]
            raise InjectedCut("export zip")
        keep -= len(chunk)
        yield chunk

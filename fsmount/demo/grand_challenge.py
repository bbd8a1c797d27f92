"""A fake Grand Challenge: the REST API, its `/media/` redirects and the signed storage behind.

It follows /work/shared/reference/grand-challenge-api.md field by field, because fsmount and the
official client are both tested against it: DRF's pagination and error bodies, knox's Bearer
handling, `application/json` without charset, hyperlinks built from the request's host, and a
separate storage origin that behaves like CloudFront (canned-policy signatures, no
`Authorization`, ranges). Sample content lives in `gc_samples`.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fsmount.demo.gc_samples import Archive, ExpectedFile, Image, Item, SampleData, Value
from fsmount.demo.healthimaging import HealthImagingFake
from fsmount.demo.httpcommon import (
    FakeService,
    FaultInjector,
    RequestLog,
    RunningServer,
    TlsFiles,
    UrlSigner,
    access_denied,
    json_response,
    range_response,
    start_server,
)

DEMO_TOKEN = hashlib.sha256(b"fsmount demo: grand-challenge token").hexdigest()
API_PREFIX = "/api/v1/"
GCAPI_VERSIONS = {"latest_version": "0.16.1", "lowest_supported_version": "0.13.0"}
DEFAULT_URL_EXPIRY = 300.0  # CLOUDFRONT_URL_EXPIRY_SECONDS
MAX_LIMIT, DEFAULT_LIMIT = 1000, 100


class _Denied(Exception):
    """Raised by authentication to answer 401 at once, as DRF does."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.response = json_response(
            {"detail": detail}, 401, headers={"WWW-Authenticate": "Bearer"}
        )


def _html(status: int, text: str) -> Response:
    """Django's non-API answers (404 pages, PermissionDenied, redirects) are HTML."""
    return Response(f"<h1>{text}</h1>", status, media_type="text/html")


def _not_found(model: str | None) -> Response:
    detail = f"No {model} matches the given query." if model else "Not found."
    return json_response({"detail": detail}, 404)


_UUID = re.compile(r"[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}")


def _positive_int(text: str | None, *, strict: bool, default: int, cutoff: int | None) -> int:
    """DRF's `_positive_int`: garbage, negatives (and 0 when strict) fall back to the default."""
    try:
        number = int(text) if text is not None else default
    except ValueError:
        return default
    if number < 0 or (number == 0 and strict):
        return default
    return min(number, cutoff) if cutoff else number


def _slice(rows: list[Any], offset: int, limit: int) -> list[Any]:
    return rows[offset : offset + limit]


def _replace_query(url: str, **params: int | None) -> str:
    """DRF's replace/remove_query_param: re-encodes the query with keys sorted."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    for key, value in params.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = [str(value)]
    return urlunsplit(parts._replace(query=urlencode(sorted(query.items()), doseq=True)))


@dataclass(frozen=True)
class _Call:
    """What a handler needs to know about one API request."""

    request: Request
    origin: str  # scheme://host as the client addressed us: hyperlinks are built from it
    authenticated: bool
    pk: str | None


Handler = Callable[["GrandChallengeFake", _Call], Response]


class GrandChallengeFake(FakeService):
    """Both servers of the fake (API host and storage origin) and the knobs tests turn.

    One `log` records both servers; storage requests have the kind "storage". Knobs are plain
    attributes, read on every request, so setting them from a test thread takes effect at once:
    `url_expiry` (seconds a new signed storage URL stays valid), `unstable_order` (item
    pages overlap and reorder, see `_unstable_pick`), `storage_hold` (seconds each storage
    request is held, in flight, before it is answered: overlapping requests then show in
    `log.peak_in_flight("storage")`) and `api_hold` (the same for API and `/media/` requests,
    to play a distant server). `api_faults` and `storage_faults` (`FaultInjector`) make
    either server misbehave. Item records handed out by listings count as `log.records("items")`.

    DICOM image sets are served by a third server, a fake AWS HealthImaging (`healthimaging`,
    its requests counted as "healthimaging" in the same log): the API's
    `cases/images/<pk>/dicom/instances/` (kind "instances") needs the token, answers 404
    `{"detail":"This image does not have a DICOM Image Set."}` for an image without a set, and
    lists each instance once per frame with a request signed for HealthImaging when it answers.
    """

    def __init__(self, *, tls: TlsFiles | None = None, key_pair_id: str = "K2JCJMDEHXQW5F") -> None:
        self.data = SampleData()
        self.log = RequestLog()
        self.token = DEMO_TOKEN
        self.url_expiry = DEFAULT_URL_EXPIRY
        self.unstable_order = False
        self.storage_hold = 0.0
        self.api_hold = 0.0
        self._images_by_name: tuple[tuple[tuple[str, ...], int], list[Image]] | None = None
        self._item_rows_of: (
            tuple[tuple[tuple[str, ...], int], list[tuple[Archive, Item]]] | None
        ) = None
        self.ca_file: Path | None = tls.ca_file if tls else None
        self._signer = UrlSigner(hashlib.sha256(DEMO_TOKEN.encode()).digest(), key_pair_id)
        self._list_requests = 0
        self._lock = threading.Lock()
        self.api_faults = FaultInjector(self._api_app, seed=1)
        self.storage_faults = FaultInjector(self._storage_app, seed=2)
        self._storage: RunningServer = start_server(self.storage_faults, tls=tls)
        try:
            self.healthimaging = HealthImagingFake(
                self.data.image_set, self.log, forbidden=self.token, tls=tls
            )
            try:
                self._api: RunningServer = start_server(self.api_faults, tls=tls)
            except BaseException:
                self.healthimaging.server.stop()
                raise
        except BaseException:
            self._storage.stop()
            raise
        self._servers = (self._api, self._storage, self.healthimaging.server)
        self._injectors = (self.api_faults, self.storage_faults, self.healthimaging.faults)
        self.storage_url = self._storage.url
        self.api_url = self._api.url + API_PREFIX

    # ----------------------------------------------------------------- public API for tests

    def archive_slugs(self) -> list[str]:
        """Every archive, private ones included, in the server's order."""
        return [archive.slug for archive in self.data.archives]

    def expected_archive(self, slug: str) -> dict[str, ExpectedFile]:
        """The files fsmount must show under `grand-challenge/<slug>/` (paths use '/')."""
        return self.data.expected_tree(slug)[0]

    def expected_dirs(self, slug: str) -> set[str]:
        """The directories under `grand-challenge/<slug>/`, item directories included."""
        return self.data.expected_tree(slug)[1]

    def reset_faults(self) -> None:
        """Every server well-behaved again, HealthImaging's knobs and clock included."""
        super().reset_faults()
        self.healthimaging.reset()

    def add_item(self, slug: str) -> str:
        """Add a light item (a Value and a CSV file) to an archive at runtime; returns its pk."""
        return self.data.add_item(slug)

    # ----------------------------------------------------------------- authentication

    def _authenticate(self, request: Request) -> bool:
        """knox's TokenAuthentication: another scheme or none is anonymous, a bad Bearer is 401."""
        words = request.headers.get("authorization", "").split()
        if not words or words[0].lower() != "bearer":
            return False
        if len(words) == 1:
            raise _Denied("Invalid token header. No credentials provided.")
        if len(words) > 2:
            raise _Denied("Invalid token header. Token string should not contain spaces.")
        if words[1] != self.token:
            raise _Denied("Invalid token.")
        return True

    def _visible(self, call: _Call, archive: Archive) -> bool:
        return archive.public or call.authenticated

    # ----------------------------------------------------------------- JSON shapes

    def _archive_json(self, call: _Call, archive: Archive) -> dict[str, Any]:
        return {
            "pk": archive.pk,
            "title": archive.title,
            "logo": f"{call.origin}/media/logos/archive/{archive.pk}/logo.x20.jpeg",
            "description": archive.description,
            "api_url": f"{call.origin}{API_PREFIX}archives/{archive.pk}/",
            "url": f"{call.origin}/archives/{archive.slug}/",
        }

    def _value_json(self, call: _Call, civ: Value) -> dict[str, Any]:
        socket = civ.socket.to_json()
        return {
            "socket": socket,
            "interface": dict(socket),
            "value": civ.value,
            "file": f"{call.origin}/media/{quote(civ.file.key)}" if civ.file else None,
            "image": f"{call.origin}{API_PREFIX}cases/images/{civ.image.pk}/"
            if civ.image
            else None,
            "pk": civ.pk,
        }

    def _item_json(self, call: _Call, archive: Archive, item: Item) -> dict[str, Any]:
        protocol = archive.hanging_protocol
        return {
            "pk": item.pk,
            "title": item.title,
            "archive": f"{call.origin}{API_PREFIX}archives/{archive.pk}/",
            "values": [self._value_json(call, civ) for civ in item.values],
            "hanging_protocol": protocol,
            "optional_hanging_protocols": [],
            "view_content": archive.view_content,
        }

    def _image_json(self, call: _Call, image: Image) -> dict[str, Any]:
        files = [
            {
                "pk": f.pk,
                "image": image.pk,
                "file": f"{call.origin}/media/{quote(f.stored.key)}",
                "image_type": f.image_type,
            }
            for f in image.files
        ]
        image_set = image.image_set
        return {
            "pk": image.pk,
            "name": image.name,
            "files": files,
            **image.meta,
            "dicom_image_set": {"image_set_id": image_set.image_set_id} if image_set else None,
            "api_url": f"{call.origin}{API_PREFIX}cases/images/{image.pk}/",
        }

    # ----------------------------------------------------------------- pagination

    def _page(
        self,
        call: _Call,
        rows: list[Any],
        render: Callable[[Any], Any],
        pick: Callable[[list[Any], int, int], list[Any]] | None = None,
    ) -> Response:
        """DRF LimitOffsetPagination with GC's MaxLimit1000 and PAGE_SIZE 100.

        `pick(rows, offset, limit)` chooses the page's rows; by default the plain slice.
        """
        params = call.request.query_params
        limit = _positive_int(
            params.get("limit"), strict=True, default=DEFAULT_LIMIT, cutoff=MAX_LIMIT
        )
        offset = _positive_int(params.get("offset"), strict=False, default=0, cutoff=None)
        count = len(rows)
        page = [] if count == 0 or offset > count else (pick or _slice)(rows, offset, limit)
        url = str(call.request.url)
        next_link = previous = None
        if offset + limit < count:
            next_link = _replace_query(url, limit=limit, offset=offset + limit)
        if offset > 0:
            previous = _replace_query(
                url, limit=limit, offset=offset - limit if offset - limit > 0 else None
            )
        return json_response(
            {
                "count": count,
                "next": next_link,
                "previous": previous,
                "results": [render(row) for row in page],
            }
        )

    def _unstable_pick(self, rows: list[Any], offset: int, limit: int) -> list[Any]:
        """Mimic PostgreSQL paging an unordered queryset: every list request sees its own order.

        List request n gets the window of the stable order that starts
        `(n % 3) * max(1, limit // 10)` rows before the requested offset (never before 0),
        reversed when n is odd. Consecutive pages therefore overlap (duplicates) and may skip
        rows, while `count` stays exact and repeated listings eventually show every item:
        clients must dedupe by pk and cross-check `count`.
        """
        with self._lock:
            self._list_requests += 1
            n = self._list_requests
        start = offset - min(offset, (n % 3) * max(1, limit // 10))
        window = rows[start : start + limit]
        if n % 2:
            window.reverse()
        return window

    # ----------------------------------------------------------------- handlers

    def _gcapi(self, call: _Call) -> Response:
        return json_response(GCAPI_VERSIONS)

    def _archives(self, call: _Call) -> Response:
        archives = [a for a in self.data.archives if self._visible(call, a)]
        slug = call.request.query_params.get("slug")
        if slug is not None:
            archives = [a for a in archives if a.slug == slug]
        return self._page(call, archives, lambda a: self._archive_json(call, a))

    def _archive(self, call: _Call) -> Response:
        if call.pk is None or not _UUID.fullmatch(call.pk):
            return _not_found(None)
        for archive in self.data.archives:
            if archive.pk == call.pk and self._visible(call, archive):
                return json_response(self._archive_json(call, archive))
        return _not_found("Archive")

    def _items(self, call: _Call) -> Response:
        wanted = call.request.query_params.get("archive")
        archives = [a for a in self.data.archives if self._visible(call, a)]
        if wanted is not None:
            known = {a.pk: a for a in self.data.archives}
            if wanted not in known:
                choice = "Select a valid choice. That choice is not one of the available choices."
                return json_response({"archive": [choice]}, 400)
            archives = [a for a in archives if a.pk == wanted]
        rows = self._item_rows(archives)
        pick = self._unstable_pick if self.unstable_order else None

        def render(row: tuple[Archive, Item]) -> dict[str, Any]:
            self.log.add_records("items")
            return self._item_json(call, *row)

        return self._page(call, rows, render, pick)

    def _item(self, call: _Call) -> Response:
        if call.pk is None or not _UUID.fullmatch(call.pk):
            return _not_found(None)
        found = self.data.item(call.pk)
        if found is None or not self._visible(call, found[0]):
            return _not_found("ArchiveItem")
        return json_response(self._item_json(call, *found))

    def _images(self, call: _Call) -> Response:
        """ImageViewSet's list: images the user may see, `?archive=<pk>` (django-filter's
        ModelMultipleChoiceFilter over the images used by the archive's items), ordered by
        `name` (Image.Meta), which is not unique: pages of equal names may move, as items do."""
        wanted = call.request.query_params.getlist("archive")
        archives = [a for a in self.data.archives if self._visible(call, a)]
        if wanted:
            known = {a.pk for a in self.data.archives}
            for pk in wanted:
                if not _UUID.fullmatch(pk):
                    return json_response(
                        {"archive": [f"\u201c{pk}\u201d is not a valid value."]}, 400
                    )
                if pk not in known:
                    choice = f"Select a valid choice. {pk} is not one of the available choices."
                    return json_response({"archive": [choice]}, 400)
            archives = [a for a in archives if a.pk in wanted]
        rows = self._image_rows(archives)
        pick = self._unstable_pick if self.unstable_order else None
        return self._page(call, rows, lambda image: self._image_json(call, image), pick)

    def _item_rows(self, archives: list[Archive]) -> list[tuple[Archive, Item]]:
        """The items of `archives`, kept while the data set is unchanged: gathered for every
        page, 100,000 of them made the fake, not the client, most of a listing's time."""
        key = (tuple(a.pk for a in archives), self.data.version)
        cached = self._item_rows_of
        if cached is None or cached[0] != key:
            rows = [(a, item) for a in archives for item in self.data.items(a)]
            cached = self._item_rows_of = (key, rows)
        return cached[1]

    def _image_rows(self, archives: list[Archive]) -> list[Image]:
        """The images of `archives` by name; kept while the data set is unchanged, so paging
        through 100,000 images does not gather them again for every page."""
        key = (tuple(a.pk for a in archives), self.data.version)
        cached = self._images_by_name
        if cached is None or cached[0] != key:
            images = {
                civ.image.pk: civ.image
                for archive in archives
                for item in self.data.items(archive)
                for civ in item.values
                if civ.image is not None
            }
            cached = self._images_by_name = (key, sorted(images.values(), key=lambda i: i.name))
        return cached[1]

    def _image(self, call: _Call) -> Response:
        if call.pk is None or not _UUID.fullmatch(call.pk):
            return _not_found(None)
        found = self.data.image(call.pk)
        if found is None or not self._visible(call, found[0]):
            return _not_found("Image")
        return json_response(self._image_json(call, found[1]))

    def _instances(self, call: _Call) -> Response:
        """`cases/images/<pk>/dicom/instances/`: every instance of the image's set, once per
        frame, each with a request signed for HealthImaging now (they expire together)."""
        if not call.authenticated:
            return _Denied("Authentication credentials were not provided.").response
        if call.pk is None or not _UUID.fullmatch(call.pk):
            return _not_found(None)
        found = self.data.image(call.pk)
        if found is None or not self._visible(call, found[0]):
            return _not_found("Image")
        image_set = found[1].image_set
        if image_set is None:
            return json_response({"detail": "This image does not have a DICOM Image Set."}, 404)
        instances = [
            {
                "sop_instance_uid": entry.sop_instance_uid,
                "get_instance": self.healthimaging.get_instance(image_set, entry),
            }
            for entry in image_set.entries
        ]
        return json_response({"image_set_id": image_set.image_set_id, "instances": instances})

    def _interfaces(self, call: _Call) -> Response:
        if not call.authenticated:
            return _Denied("Authentication credentials were not provided.").response
        sockets = sorted(self.data.sockets, key=lambda s: s.pk)
        slug = call.request.query_params.get("slug")
        if slug is not None:
            sockets = [s for s in sockets if s.slug == slug]
        if call.pk is not None:
            match = [s for s in sockets if str(s.pk) == call.pk]
            return json_response(match[0].to_json()) if match else _not_found("ComponentInterface")
        return self._page(call, sockets, lambda s: s.to_json())

    def _media(self, request: Request) -> Response:
        """GC's serving view: its own token check (a bad one is anonymous), then a 302."""
        key = request.url.path.removeprefix("/media/")
        found = self.data.stored(key)
        if found is None:
            return _html(404, "File not found.")
        try:
            authenticated = self._authenticate(request)
        except _Denied:
            authenticated = False
        archive, stored = found
        if not (archive.public or authenticated):
            return _html(403, "Forbidden") if key.startswith("images/") else _html(404, "Not Found")
        expires = time.time() + self.url_expiry
        location = self._signer.canned(f"{self.storage_url}/{quote(stored.key)}", expires)
        return Response(b"", 302, headers={"Location": location}, media_type="text/html")

    _ROUTES: tuple[tuple[re.Pattern[str], str, Handler], ...] = (
        (re.compile(r"gcapi/"), "gcapi", _gcapi),
        (re.compile(r"archives/"), "archives", _archives),
        (re.compile(r"archives/items/"), "items", _items),
        (re.compile(r"archives/items/(?P<pk>[^/.]+)/"), "item", _item),
        (re.compile(r"archives/(?P<pk>[^/.]+)/"), "archive", _archive),
        (re.compile(r"cases/images/"), "images", _images),
        (re.compile(r"cases/images/(?P<pk>[^/.]+)/"), "image", _image),
        (re.compile(r"cases/images/(?P<pk>[^/.]+)/dicom/instances/"), "instances", _instances),
        (re.compile(r"components/interfaces/(?:(?P<pk>[^/.]+)/)?"), "interfaces", _interfaces),
    )

    def _route(self, rest: str) -> tuple[str, Handler, str | None] | None:
        for regex, kind, handler in self._ROUTES:
            if match := regex.fullmatch(rest):
                return kind, handler, match.groupdict().get("pk")
        return None

    def _dispatch(self, request: Request) -> tuple[str, Response]:
        """Pick the handler for a request; returns the kind it is counted under and the answer."""
        path = request.url.path
        if path.startswith("/media/"):
            return "media", self._media(request)
        rest = path.removeprefix(API_PREFIX) if path.startswith(API_PREFIX) else None
        route = self._route(rest) if rest is not None else None
        if route is None:
            if rest is not None and not rest.endswith("/") and self._route(rest + "/"):
                target = path + "/" + (f"?{request.url.query}" if request.url.query else "")
                return "redirect", Response(b"", 301, headers={"Location": target})
            return "other", _html(404, "Not Found")
        kind, handler, pk = route
        if request.method not in ("GET", "HEAD"):
            detail = f'Method "{request.method}" not allowed.'
            return kind, json_response({"detail": detail}, 405, headers={"Allow": "GET, HEAD"})
        try:
            authenticated = kind != "gcapi" and self._authenticate(request)
        except _Denied as denied:
            return kind, denied.response
        origin = f"{request.url.scheme}://{request.url.netloc}"
        return kind, handler(self, _Call(request, origin, authenticated, pk))

    async def _api_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if self.api_hold:
            await trio.sleep(self.api_hold)
        kind, response = self._dispatch(request)
        self.log.record(kind, request)
        await _without_body_for_head(request, response)(scope, receive, send)

    # ----------------------------------------------------------------- storage origin

    def _serve_object(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response(b"", 405, headers={"Allow": "GET, HEAD"})
        if "authorization" in request.headers:
            body = (
                "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed; "
                "only the X-Amz-Algorithm query parameter, Signature query string parameter or "
                "the Authorization header should be specified</Message></Error>"
            )
            return Response(body.encode(), 400, media_type="application/xml")
        problem = self._signer.verify(str(request.url))
        if problem is not None:
            return access_denied(problem)
        found = self.data.stored(request.url.path.removeprefix("/"))
        if found is None:
            body = b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>"  # noqa: E501
            return Response(body, 404, media_type="application/xml")
        stored = found[1]
        return range_response(
            request,
            size=stored.payload.size,
            read=stored.payload.read,
            etag=stored.etag,
            last_modified=stored.payload.last_modified or 0.0,
            content_type=stored.content_type,
        )

    async def _storage_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        self.log.record("storage", request)
        with self.log.in_flight("storage"):
            if self.storage_hold:
                await trio.sleep(self.storage_hold)
            await self._serve_object(request)(scope, receive, send)


def _without_body_for_head(request: Request, response: Response) -> Response:
    """HEAD gets GET's headers (Content-Length included) and no body, as Django answers it."""
    if request.method != "HEAD":
        return response
    head = Response(b"", response.status_code)
    head.raw_headers = response.raw_headers
    return head

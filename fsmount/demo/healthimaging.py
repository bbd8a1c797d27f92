"""A fake AWS HealthImaging: GetDICOMInstance behind SigV4-style signed headers.

Grand Challenge stores DICOM images as HealthImaging image sets and hands clients one signed
request per instance (the fake Grand Challenge's `cases/images/<pk>/dicom/instances/` asks
`get_instance` here for them). What it follows, from the grand-challenge.org source, gcapi
0.16.1 and the AWS documentation (issue 13):

- Each request is signed with SigV4 headers, all of them when the instances endpoint answers:
  `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`,
  `X-Amz-Date`, and with role credentials `X-Amz-Security-Token`. There is no presigned URL.
- The method, the host and `Accept` are signed: a client must send them exactly as given.
  AWS rejects a request arriving more than about 5 minutes after its `X-Amz-Date` (403,
  "Signature expired"); a missing or wrong signature gets 403 too.
- No size is given anywhere. Whether the service honours `Range`, or sends `Content-Length`,
  is unknown: both are knobs (`honour_range`, `send_length`), off by default, which is the
  hardest case for a client (a ranged request answered 200 with the whole body, and a body
  without a length: chunked).
- The Grand Challenge token must never reach this origin: a request carrying it is refused
  (400) and counted in `token_seen`.

An HMAC over the signed parts stands in for SigV4's key derivation: tests need tampering and
expiry to be detected, not AWS's exact algorithm. The fake's clock can be moved forward
(`advance_clock`), which ages every signature given so far without waiting.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import trio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from fsmount.demo.dicom_samples import DicomInstance
from fsmount.demo.gc_samples import DicomImageSet
from fsmount.demo.httpcommon import (
    FaultInjector,
    RequestLog,
    RunningServer,
    TlsFiles,
    json_response,
    parse_range,
    start_server,
)

SIGNATURE_LIFETIME = 300.0  # seconds after X-Amz-Date that AWS still accepts a request
REGION = "eu-central-1"
DATASTORE = hashlib.md5(b"fsmount demo datastore").hexdigest()
ACCESS_KEY = "ASIAFSMOUNTDEMO00001"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEFsmountDemoSessionToken"
SIGNED_HEADERS = "accept;host;x-amz-date;x-amz-security-token"
CHUNK = 64 << 10  # bytes per body message: a cut fault lands mid-instance
_DATE = "%Y%m%dT%H%M%SZ"
_PATH = re.compile(
    r"/datastore/(?P<ds>[0-9a-f]{32})/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)"
    r"/instances/(?P<sop>[0-9.]+)"
)


def _aws_error(status: int, kind: str, message: str) -> Response:
    """HealthImaging's REST-JSON error: the type in `x-amzn-ErrorType` and in the body."""
    body = {"__type": kind, "message": message} if kind else {"message": message}
    return json_response(body, status, headers={"x-amzn-ErrorType": kind or "Forbidden"})


class HealthImagingFake:
    """The GetDICOMInstance endpoint of one region, serving the image sets `image_sets` finds.

    Knobs are plain attributes read on every request: `honour_range`, `send_length`,
    `lifetime` (seconds a signature stays valid). `faults` (a `FaultInjector`) makes it
    misbehave; requests are counted in the shared `log` under the kind "healthimaging".
    """

    def __init__(
        self,
        image_sets: Callable[[str], DicomImageSet | None],
        log: RequestLog,
        *,
        forbidden: str,
        tls: TlsFiles | None = None,
    ) -> None:
        self.log = log
        self.honour_range = False
        self.send_length = False
        self.lifetime = SIGNATURE_LIFETIME
        self.token_seen = 0
        self._image_sets = image_sets
        self._forbidden = forbidden
        self._secret = hashlib.sha256(b"fsmount demo: healthimaging secret key").digest()
        self._clock_offset = 0.0
        self._lock = threading.Lock()
        self.faults = FaultInjector(self._app, seed=3)
        self.server: RunningServer = start_server(self.faults, tls=tls)
        self.url = self.server.url

    # ----------------------------------------------------------------- the clock

    def now(self) -> float:
        return time.time() + self._clock_offset

    def advance_clock(self, seconds: float) -> None:
        """Move this service's clock forward: every signature given so far ages by `seconds`
        (new ones are dated by the moved clock)."""
        with self._lock:
            self._clock_offset += seconds

    def reset(self) -> None:
        """Back to the defaults: no Range, no length, the real lifetime, the real clock."""
        self.honour_range = self.send_length = False
        self.lifetime = SIGNATURE_LIFETIME
        self.token_seen = 0
        with self._lock:
            self._clock_offset = 0.0

    # ----------------------------------------------------------------- signing

    def _signature(self, method: str, target: str, host: str, headers: dict[str, str]) -> str:
        canonical = "\n".join(
            [
                method,
                target,
                f"host:{host}",
                f"accept:{headers.get('accept', '')}",
                f"x-amz-date:{headers.get('x-amz-date', '')}",
                f"x-amz-security-token:{headers.get('x-amz-security-token', '')}",
            ]
        )
        return hmac.new(self._secret, canonical.encode(), hashlib.sha256).hexdigest()

    def get_instance(self, image_set: DicomImageSet, instance: DicomInstance) -> dict[str, Any]:
        """The signed request for one instance, as the instances endpoint hands it out: to be
        passed verbatim to `httpx.stream(**get_instance)`."""
        path = (
            f"/datastore/{DATASTORE}/studies/{instance.study_instance_uid}"
            f"/series/{instance.series_instance_uid}/instances/{instance.sop_instance_uid}"
        )
        query = f"imageSetId={quote(image_set.image_set_id)}"
        date = time.strftime(_DATE, time.gmtime(self.now()))
        headers = {
            "Accept": f"application/dicom; transfer-syntax={instance.transfer_syntax}",
            "X-Amz-Date": date,
            "X-Amz-Security-Token": SESSION_TOKEN,
        }
        host = self.url.split("://", 1)[1]
        lowered = {name.lower(): value for name, value in headers.items()}
        signature = self._signature("GET", f"{path}?{query}", host, lowered)
        headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{date[:8]}/{REGION}/medical-imaging/"
            f"aws4_request, SignedHeaders={SIGNED_HEADERS}, Signature={signature}"
        )
        return {
            "url": f"{self.url}{path}?{query}",
            "method": "GET",
            "data": None,
            "headers": headers,
        }

    def _refusal(self, request: Request) -> Response | None:
        """Why AWS would refuse this request, or None when the signature holds."""
        headers = dict(request.headers)
        if any(self._forbidden in value for value in headers.values()):
            with self._lock:
                self.token_seen += 1
            return _aws_error(400, "InvalidRequestException", "Foreign credentials in request")
        authorization = headers.get("authorization", "")
        if not authorization.startswith("AWS4-HMAC-SHA256 "):
            return _aws_error(403, "", "Missing Authentication Token")
        given = authorization.rpartition("Signature=")[2]
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        wanted = self._signature(request.method, target, headers.get("host", ""), headers)
        if not hmac.compare_digest(given, wanted):
            return _aws_error(
                403,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided.",
            )
        date = headers.get("x-amz-date", "")
        try:
            signed_at = calendar.timegm(time.strptime(date, _DATE))
        except ValueError:
            return _aws_error(403, "InvalidSignatureException", "Invalid X-Amz-Date")
        now = self.now()
        if now - signed_at > self.lifetime:
            limit = time.strftime(_DATE, time.gmtime(now - self.lifetime))
            message = f"Signature expired: {date} is now earlier than {limit}"
            return _aws_error(403, "InvalidSignatureException", message)
        return None

    # ----------------------------------------------------------------- serving

    def _instance(self, request: Request) -> DicomInstance | None:
        match = _PATH.fullmatch(request.url.path)
        image_set = self._image_sets(request.query_params.get("imageSetId", ""))
        if match is None or image_set is None or match["ds"] != DATASTORE:
            return None
        for instance in image_set.entries:
            if (
                instance.sop_instance_uid == match["sop"]
                and instance.series_instance_uid == match["series"]
                and instance.study_instance_uid == match["study"]
            ):
                return instance
        return None

    def _serve(self, request: Request) -> Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        instance = self._instance(request)
        if instance is None:
            return _aws_error(404, "ResourceNotFoundException", "Instance not found")
        data = instance.data
        headers = {"content-type": f"application/dicom; transfer-syntax={instance.transfer_syntax}"}
        status, start, end = 200, 0, len(data)
        wanted = (
            parse_range(request.headers["range"], len(data)) if "range" in request.headers else None
        )
        if self.honour_range and wanted == "unsatisfiable":
            return _aws_error(416, "ValidationException", "Range not satisfiable")
        if self.honour_range and isinstance(wanted, tuple):
            status, start, end = 206, wanted[0], wanted[1] + 1
            headers["content-range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if self.send_length:
            headers["content-length"] = str(end - start)

        async def body() -> AsyncIterator[bytes]:
            for offset in range(start, end, CHUNK):
                yield data[offset : min(offset + CHUNK, end)]
                await trio.lowlevel.checkpoint()

        return StreamingResponse(body(), status, headers=headers)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        self.log.record("healthimaging", request)
        with self.log.in_flight("healthimaging"):
            await self._serve(request)(scope, receive, send)

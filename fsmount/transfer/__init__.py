"""The one HTTP layer: API clients, storage/CDN downloads, retries, deadlines, signed URLs.

Policy, in one place:
- every operation has an overall deadline; retries (connection errors, timeouts, 408, 429,
  5xx) back off exponentially with jitter inside it, honouring `Retry-After` and Scenario's
  `remainingSeconds`; other 4xx are final (`policy`);
- a stall (no byte for `stall_timeout`) is a timeout, hence retried (`clients`);
- an interrupted body resumes from the last byte received, with `If-Range` so versions never
  mix (`storage`);
- signed URLs are reused for every range until shortly before they expire, and asked for again
  once when storage answers 403; a request signed in its headers (SigV4) is sent with exactly
  its method, URL and headers, plus only the unsigned Range ones (`urls`, `storage`);
- a body of unknown length (`fetch` to the end) is bounded by stalls, not by the deadline, and
  every byte it brought renews the retry budget (`storage`);
- storage and CDN requests go through a client that has no credentials at all, so the API's
  `Authorization` can never reach them; URLs are logged without their query strings (`api`,
  `storage`, `urls`).

The rest of fsmount imports from here, not from the modules.
"""

from fsmount.transfer.api import ApiClient, Credentials
from fsmount.transfer.clients import raise_read_size
from fsmount.transfer.policy import HttpPolicy, TransferStats
from fsmount.transfer.storage import Storage
from fsmount.transfer.urls import redact, url_expiry

__all__ = [
    "ApiClient",
    "Credentials",
    "HttpPolicy",
    "Storage",
    "TransferStats",
    "raise_read_size",
    "redact",
    "url_expiry",
]

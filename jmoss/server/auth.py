"""API keys: every route but ``/health`` and the chat page's HTML needs ``Authorization: Bearer KEY``.

Keys come from ``--api-key`` (repeatable), ``JMOSS_API_KEY`` or ``--api-key-file`` (one per line);
with none the server is open, as before, and binding a non-loopback address says so at start-up.
A request without a valid key gets 401 in OpenAI's error shape before its body is read, whatever
the route (unknown paths too, so they reveal nothing). Keys are compared with
``hmac.compare_digest`` against every configured key, so the time taken says nothing about how
much of a key was right, nor which key it nearly matched.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from jmoss.errors import JmossError

ENV_VAR = "JMOSS_API_KEY"
PUBLIC_PATHS = frozenset({"/health"})


class ApiKeyError(JmossError):
    """An API key given to the server is malformed, or its key file cannot be read."""


def check_key(key: str) -> str:
    """A key as it can travel in a header: printable ASCII without spaces, at least 8 characters."""
    if not 8 <= len(key) <= 512 or not all("!" <= c <= "~" for c in key):
        raise ApiKeyError("an API key must be 8-512 printable ASCII characters without spaces "
                          "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return key


def load_keys(keys: Iterable[str] = (), key_file: str | Path | None = None, *, environ: dict | None = None) -> list[str]:
    """The keys to accept: ``keys``, then ``JMOSS_API_KEY`` (whitespace-separated), then ``key_file``'s lines
    (blank lines and ``#`` comments skipped)."""
    environ = os.environ if environ is None else environ
    found = list(keys) + environ.get(ENV_VAR, "").split()
    if key_file is not None:
        try:
            text = Path(key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyError(f"cannot read the API key file {key_file}: {exc}") from None
        found += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ApiKeyError(f"the API key file {key_file} has no key in it")
    return list(dict.fromkeys(check_key(k) for k in found))


def exposure_warning(host: str, keys: Iterable[str]) -> str | None:
    """The start-up warning for a server reachable from other machines with no key, or None."""
    if any(True for _ in keys) or _is_loopback(host):
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
            f"(set --api-key, {ENV_VAR} or --api-key-file)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _error(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "invalid_api_key"}}).encode()


class ApiKeyMiddleware:
    """ASGI middleware answering 401 unless the request carries one of ``keys`` (or is public).

    ``public`` decides per request (method, path) whether it needs no key: /health always, the
    chat page's ``GET /`` when served, ``/metrics`` with --metrics-public.
    """

    def __init__(self, app: Any, keys: Iterable[str], public: Callable[[str, str], bool]):
        self.app = app
        self.keys = [k.encode("ascii") for k in keys]
        self.public = public

    def authorized(self, header: bytes | None) -> bool:
        scheme, _, given = (header or b"").partition(b" ")
        given = given.strip()
        ok = False
        for key in self.keys:  # no early exit: every key is compared every time
            ok |= hmac.compare_digest(given, key)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http" or self.public(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if self.authorized(header):
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided." if header else
                   "You didn't provide an API key. Send it in the Authorization header: `Authorization: Bearer KEY`.")
        body = _error(message)
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="jmoss"')]})
        await send({"type": "http.response.body", "body": body})

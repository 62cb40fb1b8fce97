"""The dashboard's sign-in cookie, and the admin listener's refusal of cross-site requests.

With `[api] token_file` set, a browser cannot send the bearer header from a page, so the
dashboard's sign-in form posts the token once; the daemon checks it (in constant time) and
answers with a cookie the API's auth accepts as it accepts the header. The cookie holds an
HMAC of the token, not the token: it is cookie-safe text whatever the token's bytes, and
changing the token ends every session. It is `HttpOnly` (no script reads it) and
`SameSite=Strict` (a browser does not send it with a request another site starts).

SameSite is not enough alone: a "site" is a scheme and a registrable domain, ports ignored,
so any other page served from the same host (a webhook route, another service on localhost)
is same-site and would get the cookie. Every state-changing request (not GET or HEAD) that a
browser marks as started elsewhere is therefore refused: by `Sec-Fetch-Site` (any value but
`same-origin` or `none`), or, from a browser too old to send that, by an `Origin` whose host is
not the request's own `Host`.
Clients that are not browsers (curl, boto3, the CLI) send neither header and are not affected.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from daemon.http.wire import AnyRequest

COOKIE = "lambdaemon_session"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SAME = frozenset({"same-origin", "none"})  # `none`: the user typed it or used a bookmark


def cookie_value(token: bytes) -> bytes:
    """What the cookie carries for this token."""
    return hmac.new(token, b"lambdaemon dashboard session v1", hashlib.sha256).hexdigest().encode()


def carries_session(request: AnyRequest, expected: bytes | None) -> bool:
    """Whether the request's Cookie header holds the session cookie for `expected`."""
    if expected is None:
        return False
    for header in request.headers.getall("Cookie", ()):
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return hmac.compare_digest(value.encode("utf-8", "surrogateescape"), expected)
    return False


def set_cookie(value: bytes) -> str:
    """The Set-Cookie header that signs a browser in (a session cookie, gone at browser exit).
    No `Secure`: the admin listener is plain HTTP, normally on loopback."""
    return f"{COOKIE}={value.decode()}; Path=/; HttpOnly; SameSite=Strict"


def clear_cookie() -> str:
    return f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"


def cross_site(request: AnyRequest) -> str | None:
    """Why a state-changing request is refused as started by another site, or None."""
    if request.method in _SAFE_METHODS:
        return None
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:  # set by the browser itself, no page can forge it: it decides
        if fetch_site in _SAME:
            return None
        return f"a {fetch_site[:50]} request may not change anything here (Sec-Fetch-Site)"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    host = request.headers.get("Host", "")
    try:
        origin_host = urlsplit(origin).netloc if origin != "null" else None
    except ValueError:
        origin_host = None
    if origin_host is None or origin_host.lower() != host.lower():
        return f"a request from origin {origin[:100]!r} may not change anything on {host[:100]!r}"
    return None

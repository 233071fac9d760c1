"""Checks on what a request says about itself, before any route runs: Host and Origin, query string, JSON body shape.

Host: a page on another site can make a browser talk to the explorer by pointing its own DNS name at the
explorer's address (DNS rebinding); the browser then sends that name as `Host`. So a name is answered only when it
is `localhost`, the name the server was bound to, or one given with `--allow-host`; IP literals are always fine
(nobody can rebind a literal). Origin: a browser names the page a cross-origin request comes from; one whose
host and port differ from `Host` is refused, so other origins (another port on the same shared host included)
cannot drive the API even where CORS would not stop the request.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, urlsplit

from .api import BadRequest

MAX_QUERY = 4096  # characters of query string; the page sends a few short fields
MAX_FIELDS = 16  # the largest route takes 6
MAX_JSON_DEPTH = 8  # {"supernodes": [{"nodes": [...]}]} is 4 deep
_WILDCARD = {"", "0.0.0.0", "::"}
_PORT = re.compile(r"^\d{1,5}$")


class Refused(Exception):
    """A request the guard will not answer: carries the HTTP status."""

    def __init__(self, code: int, msg: str):
        super().__init__(msg)
        self.code = code


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, str] | None:
    """`Host`-style `name[:port]` or `[v6]:port` -> (lower-case name without a trailing dot, port or ""), None if
    malformed."""
    v = value.strip()
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            return None
        name, rest = v[1:end], v[end + 1:]
        if rest and not (rest.startswith(":") and _PORT.match(rest[1:])):
            return None
        return (name.lower(), rest[1:]) if _is_ip(name) else None
    name, _, port = v.partition(":")
    if ":" in port or (port and not _PORT.match(port)) or not name:
        return None
    return name.lower().rstrip("."), port


def allowed_names(bind: str, extra=()) -> frozenset[str]:
    """Host names (not IP literals, which always pass) the server answers to."""
    names = {"localhost"}
    if bind not in _WILDCARD and not _is_ip(bind):
        names.add(bind.lower().rstrip("."))
    for e in extra:
        for n in str(e).split(","):
            if n.strip():
                hp = split_host(n)
                if hp is None:
                    raise ValueError(f"--allow-host: not a host name: {n.strip()!r}")
                names.add(hp[0])
    return frozenset(names)


def check_headers(headers, names: frozenset[str]) -> None:
    host = headers.get("Host")
    hp = split_host(host) if host else None
    if hp is None or not (_is_ip(hp[0]) or hp[0] in names):
        raise Refused(403, "unknown Host header (start ct-ray serve with --allow-host NAME to answer to NAME)")
    origin = headers.get("Origin")
    if origin is None:
        return
    u = urlsplit(origin.strip())
    if u.scheme not in ("http", "https") or not u.netloc or u.path not in ("", "/"):
        raise Refused(403, "requests from other origins are refused")
    default = {"http": "80", "https": "443"}[u.scheme]
    op = split_host(u.netloc)
    if op is None or (op[0], op[1] or default) != (hp[0], hp[1] or default):
        raise Refused(403, "requests from other origins are refused")


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def parse_query(query: str) -> dict[str, str]:
    """The query string as {name: last value}; too long, too many fields or malformed -> 400."""
    if len(query) > MAX_QUERY:
        raise BadRequest(f"query string over {MAX_QUERY} characters")
    if _BAD_PERCENT.search(query):  # parse_qsl would keep '%zz' as text
        raise BadRequest("query string has an invalid percent-encoding")
    try:
        pairs = parse_qsl(query, max_num_fields=MAX_FIELDS, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("query string is not UTF-8") from None
    except ValueError:
        raise BadRequest(f"more than {MAX_FIELDS} query fields") from None
    return dict(pairs)


_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)


def check_json_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse nesting deeper than `limit` before json.loads recurses into it (a deep body would end in a
    RecursionError). Strings are skipped whole, so brackets inside them do not count."""
    depth = 0
    for m in _TOKENS.finditer(body):
        c = m.group()[:1]
        if c in (b"[", b"{"):
            depth += 1
            if depth > limit:
                raise BadRequest(f"JSON body nested deeper than {limit} levels")
        elif c in (b"]", b"}"):
            depth -= 1

"""`ct-ray serve`: a stdlib threading HTTP server, bound to 127.0.0.1 unless told otherwise.

Routes: GET /api/{info,sweeps,graphs,graph,feature,perturbations,supernodes,graph-json,overview,auto-supernodes,diff},
PUT /api/supernodes (403 unless --allow-write), GET / and /static/* (the page built from web/ by `make setup`).
Request bodies over MAX_BODY are refused with 413 before being read; paths with `..`, backslashes or control
characters (also once or twice percent-encoded) with 400; static files are served only from inside the static
folder. Host, Origin, query string and JSON depth are checked first (guard.py); connections are served by a bounded
pool with read timeouts (http_pool.py). Every refusal is a JSON `{"error": one line}`.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
import os
import re
from http.server import BaseHTTPRequestHandler
from urllib.parse import unquote, urlsplit

from ..errors import CTRayError
from ..store.tables import Store
from .api import BadRequest, ExplorerAPI, Forbidden, NotFound
from .guard import Refused, allowed_names, check_headers, check_json_depth, parse_query
from .http_pool import BoundedHTTPServer, DeadlineReader

log = logging.getLogger(__name__)
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_BODY = 1 << 20
_DRAIN_MAX = 16 << 20  # a refused body larger than this is cut off with the connection
_SAFE_STATIC = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-/]{0,200}$")
_GET = {"info": "info", "sweeps": "sweeps", "graphs": "graphs", "graph": "graph", "feature": "feature",
        "perturbations": "perturbations", "supernodes": "get_supernodes", "overview": "overview",
        "auto-supernodes": "auto_supernodes", "diff": "diff"}


def _bad_path(raw: str) -> bool:
    p = raw
    for _ in range(3):  # catch %2e%2e and %252e%252e alike
        if ".." in p.split("/") or "\\" in p or any(ord(c) < 32 for c in p) or "/../" in p or p.endswith("/.."):
            return True
        q = unquote(p)
        if q == p:
            return False
        p = q
    return True  # still encoded after three rounds: nothing legitimate looks like that


class Handler(BaseHTTPRequestHandler):
    server_version = "ct-ray-explorer"
    sys_version = ""
    default_request_version = "HTTP/1.0"  # so an answer to a malformed request line still has headers

    def setup(self):
        super().setup()
        # every read waits at most `request_timeout`, the whole request at most `request_deadline`
        srv = self.server
        self.rfile = io.BufferedReader(DeadlineReader(self.connection, srv.request_timeout, srv.request_deadline))

    def log_message(self, fmt, *args):  # quiet by default: the terminal shows the URL and errors only
        log.debug("%s " + fmt, self.address_string(), *args)

    # --- responses ----------------------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str, cache: str = "no-store"):
        self.connection.settimeout(self.server.request_timeout)  # the read deadline does not cut the answer short
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        # everything the page needs comes from this server: no CDN, no inline scripts
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj):
        self._send(code, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def _error(self, code: int, msg: str):
        # one line: messages can quote stored text (a failed graph's error may be a whole traceback)
        self._json(code, {"error": (msg.strip().splitlines() or ["error"])[0][:500]})

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own refusals (malformed request line, 414, 431, 501) as JSON too, not an HTML page."""
        self.close_connection = True
        self._error(code, message or self.responses.get(code, ("error",))[0])

    # --- dispatch -----------------------------------------------------------------------------------------
    def _route(self):
        raw = self.path
        if _bad_path(urlsplit(raw).path):
            raise Refused(400, "bad path")
        u = urlsplit(raw)
        return unquote(u.path), parse_query(u.query)

    def _handle(self, method: str):
        try:
            check_headers(self.headers, self.server.allowed_names)
            path, q = self._route()
            api: ExplorerAPI = self.server.api
            if method == "PUT":
                if path != "/api/supernodes":
                    raise Refused(405, "only PUT /api/supernodes")
                body = self._body()
                check_json_depth(body)
                return self._json(200, api.put_supernodes(q, body))
            if path.startswith("/api/"):
                name = path[5:]
                if name == "graph-json":
                    return self._send(200, api.graph_json(), "application/json")
                if name not in _GET:
                    raise Refused(404, "unknown API route")
                fn = getattr(api, _GET[name])
                return self._json(200, fn(q) if name not in ("info", "sweeps") else fn())
            return self._static(path)
        except Refused as e:
            self._error(e.code, str(e))
        except BadRequest as e:
            self._error(400, str(e))
        except Forbidden as e:
            self._error(403, str(e))
        except (NotFound, FileNotFoundError) as e:
            self._error(404, str(e) or "not found")
        except TimeoutError:
            self.close_connection = True
            self._error(408, "request not received in time")
        except CTRayError as e:
            self._error(500, str(e))
        except Exception as e:  # a bug: one line to the page, the traceback to the log
            log.exception("explorer request %s %s failed", method, self.path)
            self._error(500, f"internal error: {type(e).__name__}")
        finally:
            self._linger()

    def _linger(self):
        """After a 413, read (and drop) a bounded part of the refused body before closing: closing a socket with
        unread input sends a TCP reset, which can destroy the 413 response before the client reads it."""
        n, self._discard = getattr(self, "_discard", 0), 0
        if not n:
            return
        self.wfile.flush()
        self.connection.settimeout(1.0)
        try:  # from the socket itself: the request's read deadline may be spent already
            while n > 0 and (chunk := self.connection.recv(min(n, 1 << 16))):
                n -= len(chunk)
        except OSError:
            pass

    def _body(self) -> bytes:
        n = self.headers.get("Content-Length")
        if n is None:
            raise Refused(411, "Content-Length required")
        try:
            n = int(n)
        except ValueError:
            raise Refused(400, "bad Content-Length") from None
        if n > MAX_BODY:
            self.close_connection = True  # the unread body must not be parsed as the next request
            self._discard = min(n, _DRAIN_MAX)
            raise Refused(413, f"request body over {MAX_BODY} bytes")
        if n < 0:
            raise Refused(400, "bad Content-Length")
        if "json" not in (self.headers.get("Content-Type") or ""):
            raise Refused(415, "send application/json")
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            raise Refused(400, "request body shorter than Content-Length")
        return body

    def _static(self, path: str):
        rel = "index.html" if path in ("/", "/index.html") else None
        if path.startswith("/static/"):
            rel = path.removeprefix("/static/")
        if rel is None or not _SAFE_STATIC.match(rel):
            raise Refused(404, "not found")
        root = os.path.realpath(STATIC_DIR)
        full = os.path.realpath(os.path.join(root, rel))
        if not full.startswith(root + os.sep):
            raise Refused(400, "bad path")
        if not os.path.isfile(full):
            if rel == "index.html":
                raise Refused(503, "the explorer page is not built: run `make setup` (npm ci + build in web/)")
            raise Refused(404, "not found")
        with open(full, "rb") as f:
            body = f.read()
        ctype = mimetypes.guess_type(full)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        self._send(200, body, ctype, cache="no-cache")

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("GET")

    def do_PUT(self):
        self._handle("PUT")

    def do_POST(self):
        self._error(405, "method not allowed")

    do_DELETE = do_PATCH = do_POST


class ExplorerServer(BoundedHTTPServer):
    def __init__(self, addr, api: ExplorerAPI, names: frozenset[str], **limits):
        self.api, self.allowed_names = api, names  # the Host names answered besides IP literals (guard.py)
        super().__init__(addr, Handler, **limits)


def make_server(store: str, *, host: str = "127.0.0.1", port: int = 8000, allow_write: bool = False,
                graph_json: str | None = None, endpoint_url: str | None = None, catalog: str | None = None,
                allow_hosts=(), **limits) -> ExplorerServer:
    """`catalog`: the store's Iceberg catalog URI (default: $CT_RAY_CATALOG, else SQLite in the store). `limits`:
    threads, waiting, timeout, deadline of the connection pool (pool.BoundedHTTPServer)."""
    opts = {"endpoint_url": endpoint_url} if endpoint_url else {}
    st = Store(store, catalog=catalog, **opts)
    if not graph_json:  # a mistyped --store is an error, not an empty explorer (a graph JSON alone needs none)
        st.check_exists()
    if graph_json and not os.path.isfile(graph_json) and "://" not in graph_json:
        raise CTRayError(f"--graph-json: no such file: {graph_json}")
    try:
        names = allowed_names(host, allow_hosts)
    except ValueError as e:
        raise CTRayError(str(e)) from None
    try:
        return ExplorerServer((host, port), ExplorerAPI(st, allow_write, graph_json), names, **limits)
    except OSError as e:
        raise CTRayError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e

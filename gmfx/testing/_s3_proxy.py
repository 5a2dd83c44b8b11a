"""A throttling HTTP proxy in front of an S3 server: deterministic ``503 SlowDown`` faults for tests.

Object stores throttle: S3 answers ``503 SlowDown`` when a prefix gets too many requests, other servers
``503 ServiceUnavailable``. :class:`ThrottlingProxy` sits on 127.0.0.1 between a client (s3fs) and a
real S3 server (moto's, see :func:`gmfx.testing.local_s3_server`) and answers the first few requests
*of each object key* that its schedule names with such a response, passing everything else through
unchanged. The schedule counts per key, not per request, so it is deterministic however the requests
of concurrent writers interleave: every scheduled key fails exactly as often as the schedule says,
then works.
"""

from __future__ import annotations

import http.client
import re
import threading
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["ThrottlingProxy"]

#: the throttling answers used in turn (S3's own, and the one of S3-compatible servers)
_THROTTLES = (
    ("SlowDown", "Please reduce your request rate."),
    ("ServiceUnavailable", "Service is unable to handle request."),
)
#: headers that belong to one connection, never forwarded
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class ThrottlingProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that throttles some requests.

    Parameters
    ----------
    upstream
        The S3 server's endpoint URL (``http://127.0.0.1:PORT``).
    schedule
        ``{pattern: failures}``: a request whose ``"METHOD /bucket/key"`` matches the regular expression
        ``pattern`` (the first that matches) is answered ``503`` the first ``failures`` times its method and
        key are seen, then passed on. E.g. ``{r"^PUT .*_frames\\.zarr/frames/c/": 2}`` throttles the writes of
        the decoded frames' chunks twice each (``PUT`` writes, ``GET`` reads, ``HEAD``, ``DELETE``).

    Use it as a context manager; :attr:`endpoint` is the URL clients use instead of ``upstream``;
    :attr:`injected` and :attr:`passed` count the throttled and the passed requests of each scheduled
    ``"METHOD /bucket/key"``.

    Examples
    --------
    >>> with local_s3_server() as s3, ThrottlingProxy(s3, {r"^PUT .*/c/": 2}) as proxy:  # doctest: +SKIP
    ...     options = s3_storage_options(proxy.endpoint)
    """

    def __init__(self, upstream: str, schedule: Mapping[str, int]) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.schedule = [(re.compile(pattern), int(failures)) for pattern, failures in schedule.items()]
        self.injected: Counter[str] = Counter()
        self.passed: Counter[str] = Counter()
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running: use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _throttle(self, method: str, path: str) -> tuple[str, str] | None:
        """The throttling answer for this request, or None to pass it on (counts it either way)."""
        key = f"{method} {urllib.parse.urlsplit(path).path}"
        failures = next((n for pattern, n in self.schedule if pattern.search(key)), None)
        if failures is None:
            return None
        with self._lock:
            seen = self._seen[key]
            self._seen[key] += 1
            if seen >= failures:
                self.passed[key] += 1
                return None
            self.injected[key] += 1
        return _THROTTLES[seen % len(_THROTTLES)]

    def __enter__(self) -> ThrottlingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
            disable_nagle_algorithm = True  # headers and body leave at once (no 40 ms delayed-ACK stalls)

            def log_message(self, format, *args):  # noqa: A002 - quiet: one line per request otherwise
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()  # always read whole: the connection is reused for the next request
                throttle = proxy._throttle(self.command, self.path)
                if throttle is not None:
                    code, message = throttle
                    answer = (
                        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                        f"<RequestId>gmfx-proxy</RequestId></Error>"
                    ).encode()
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(answer)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(answer)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                response, content = self._forward(body, headers)
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content)

            def _forward(self, body: bytes, headers: dict[str, str]) -> tuple[http.client.HTTPResponse, bytes]:
                """The upstream's answer, over one kept-alive connection per client connection."""
                for attempt in range(2):
                    if getattr(self, "_upstream", None) is None:
                        self._upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                    try:
                        self._upstream.request(self.command, self.path, body=body or None, headers=headers)
                        response = self._upstream.getresponse()
                        return response, response.read()
                    except (http.client.HTTPException, ConnectionError):
                        self._upstream.close()
                        self._upstream = None  # the server closed a kept-alive connection: open a new one, once
                        if attempt:
                            raise
                raise AssertionError("unreachable")

            def finish(self) -> None:
                super().finish()
                if getattr(self, "_upstream", None) is not None:
                    self._upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="gmfx-throttling-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

"""Prometheus /metrics over HTTP: bound to the address the configuration names (`metrics_host`,
loopback by default, so a server listening on a public address does not also publish its
metrics there), and with `metrics_require_token` only for callers that present one of the
service's bearer tokens (`Authorization: Bearer <token>`; anything else gets 401).

    endpoint = MetricsEndpoint(registry, "127.0.0.1", 9400, authenticator=None)
    endpoint.port       # the bound port (useful with port 0)
    endpoint.close()
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .auth import Authenticator, AuthError


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper never holds up close()


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class MetricsEndpoint:
    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        authenticator: Authenticator | None = None,
    ):
        handler = _handler_class(registry, authenticator)
        server_class = _IPv6Server if ":" in host else _Server
        self._server = server_class((host.strip("[]"), port), handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="proxyprefill-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _handler_class(registry: CollectorRegistry, authenticator: Authenticator | None):
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if urlsplit(self.path).path != "/metrics":
                self._reply(404, b"only /metrics is served here\n", "text/plain")
                return
            if authenticator is not None:
                header = self.headers.get("Authorization")
                metadata = [] if header is None else [("authorization", header)]
                try:
                    authenticator.identify(metadata, f"ipv4:{self.client_address[0]}")
                except AuthError as error:
                    self._reply(401, (error.message + "\n").encode(), "text/plain", bearer=True)
                    return
            self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)

        def _reply(self, status: int, body: bytes, content_type: str, bearer: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if bearer:
                self.send_header("WWW-Authenticate", 'Bearer realm="metrics"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:
            pass  # Prometheus scrapes every few seconds; a line per scrape is noise

    return MetricsHandler

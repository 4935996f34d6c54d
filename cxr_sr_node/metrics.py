"""``GET /healthz`` and ``GET /metrics`` (Prometheus text format) for operators."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from cxr_sr_node.spool import STATES, Spool


class Metrics:
    def __init__(self, spool: Spool, broker_ok: Callable[[], bool | None] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.stores = Counter("cxrsr_store_total", "C-STORE requests answered, by status", ["status"], registry=self.registry)
        self.sends = Counter("cxrsr_send_total", "send attempts, by outcome", ["outcome"], registry=self.registry)
        self.jobs = Gauge("cxrsr_jobs", "jobs in the spool, by state", ["state"], registry=self.registry)
        self.broker = Gauge("cxrsr_broker_up", "runner = celery: 1 when the last publish or declare reached "
                            "RabbitMQ, 0 when it failed (jobs then wait in the spool)", registry=self.registry)
        self.spool = spool
        self.broker_ok = broker_ok

    def stored(self, status: int) -> None:
        self.stores.labels(status=f"0x{status:04X}").inc()

    def sent(self, outcome: str) -> None:
        self.sends.labels(outcome=outcome).inc()

    def render(self) -> bytes:
        counts = self.spool.counts()
        for state in STATES:
            self.jobs.labels(state=state).set(counts.get(state, 0))
        up = self.broker_ok() if self.broker_ok is not None else None
        self.broker.set(float("nan") if up is None else float(up))  # NaN: embedded runner, or not tried yet
        return generate_latest(self.registry)


def start_http(host: str, port: int, metrics: Metrics, health: Callable[[], tuple[bool, dict]]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self, *, head: bool = False) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/metrics":
                body, ctype, code = metrics.render(), "text/plain; version=0.0.4", 200
            elif self.path == "/healthz":
                ok, detail = health()
                body, ctype, code = json.dumps({"ok": ok, **detail}).encode(), "application/json", 200 if ok else 503
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_HEAD(self) -> None:  # noqa: N802 - load balancers and probes (curl -I) ask with HEAD
            self.do_GET(head=True)

        def log_message(self, *args) -> None:  # access logs would only repeat the path
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server

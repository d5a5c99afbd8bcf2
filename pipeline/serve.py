"""Keep the model and index warm behind a loopback HTTP endpoint; the query script's fast path.

Why a server at all: a cold `casemine query` pays for imports, the query encoder and loading the
index (plus BM25) on every call; an agent asking many questions should pay that once. Why stdlib
`http.server`: one user, loopback only, JSON in and out; no framework is worth its import time.

Protocol (JSON):
- `GET /health` -> {"status", "out", "index_version", "model"}
- `POST /query` {"queries": [...], "k", "filters", "mode", "out", "expect_version"} ->
  {"index_version", "results": [[hit, ...], ...]}; 409 when the client's output root differs.
The server re-reads `CURRENT` before each request and reloads when the index was swapped, so it
never answers from a stale version for long; the client still checks the version it got.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pipeline.config import Config

# pandas, faiss and the encoder are imported inside QueryService only: the client side
# (`query_remote`) must stay cheap, it runs in every `casemine query` process.

HOST = "127.0.0.1"
# Never route loopback calls through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class QueryService:
    """A Searcher over the live index that follows `CURRENT` (used by the server and locally)."""

    def __init__(self, cfg: Config, out_root: Path):
        from pipeline.embed import model_identity
        from pipeline.index import IndexStore, index_root

        self.cfg = cfg
        self.out_root = Path(out_root).resolve()
        self.store = IndexStore(index_root(self.out_root), cfg.index)
        self.model = model_identity(cfg)
        self._searcher = None
        self._embedder = None
        self._lock = threading.Lock()

    @property
    def version(self) -> int | None:
        return self._searcher.index.version if self._searcher else None

    def ensure_current(self):
        """Load the index if none is loaded or `CURRENT` names a newer version (returns a Searcher)."""
        from pipeline.search import Searcher

        v = self.store.current_version()
        if self._searcher is None or v != self._searcher.index.version:
            idx = self.store.load(expect_model=self.model)
            if self._searcher is not None:
                self._embedder = self._searcher._embedder  # keep the warm query encoder
            self._searcher = Searcher(self.cfg, idx, self._embedder)
        return self._searcher

    def warm(self) -> None:
        s = self.ensure_current()
        s.search_many(["预热"], k=1, mode="hybrid")  # loads encoder, BM25 and jieba once

    def answer(self, queries: list[str], k: int, filters: Any, mode: str | None) -> dict[str, Any]:
        """Hits per query; `filters` is a `pipeline.index.Filters` or its dict form."""
        from pipeline.index import Filters

        if not isinstance(filters, Filters):
            filters = Filters.from_dict(filters)
        with self._lock:  # FAISS/BM25 objects are shared; one query at a time is plenty here
            s = self.ensure_current()
            hits = s.search_many(queries, k, filters, mode)
            return {"index_version": s.index.version, "model": s.index.model,
                    "results": [[h.to_dict() for h in hs] for hs in hits]}


def _handler(service: QueryService):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj: Any) -> None:
            body = json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: the agent's terminal is not a log
            pass

        def do_GET(self) -> None:
            if self.path != "/health":
                return self._send(404, {"error": "unknown path"})
            self._send(200, {"status": "ok", "out": str(service.out_root), "index_version": service.version,
                             "model": service.model})

        def do_POST(self) -> None:
            if self.path != "/query":
                return self._send(404, {"error": "unknown path"})
            try:
                n = int(self.headers.get("Content-Length", "0"))
                req = json.loads(self.rfile.read(n) or b"{}")
                if req.get("out") and Path(req["out"]).resolve() != service.out_root:
                    return self._send(409, {"error": f"this server serves {service.out_root}"})
                res = service.answer(list(req["queries"]), int(req.get("k", 5)), req.get("filters"), req.get("mode"))
                self._send(200, res)
            except Exception as e:  # noqa: BLE001 - report to the client, keep serving
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

    return Handler


def run_server(cfg: Config, out_root: Path, port: int, ready=None) -> None:
    """Serve until interrupted. Binds to loopback only: the index holds customer text."""
    service = QueryService(cfg, out_root)
    service.warm()
    httpd = ThreadingHTTPServer((HOST, port), _handler(service))
    if ready:
        ready(httpd, service)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


def _current_version(out_root: Path) -> int | None:
    """The version `<out>/index/CURRENT` names (same rule as IndexStore, without its imports)."""
    try:
        name = (Path(out_root) / "index" / "CURRENT").read_text("utf-8").strip()
    except OSError:
        return None
    return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None


def query_remote(cfg: Config, out_root: Path, queries: list[str], k: int, filters: Any,
                 mode: str | None, port: int | None = None, timeout: float = 30.0) -> dict[str, Any] | None:
    """Ask a running server; None when there is none, it serves another root, or its index is stale.

    `filters`: a `Filters`, its dict form, or None."""
    port = port or cfg.search.serve_port
    expect = _current_version(out_root)
    if filters is not None and not isinstance(filters, dict):
        filters = filters.to_dict()
    body = json.dumps({"queries": queries, "k": k, "filters": filters or {},
                       "mode": mode, "out": str(Path(out_root).resolve()), "expect_version": expect},
                      ensure_ascii=False).encode("utf-8")
    req = urllib.request.Request(f"http://{HOST}:{port}/query", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        # Connection refused comes back at once when nothing listens; the timeout covers a busy server.
        with _OPENER.open(req, timeout=timeout) as r:
            res = json.loads(r.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        return None
    if expect is not None and res.get("index_version") != expect:
        return None
    return res


def wait_until_up(port: int, timeout: float = 60.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with _OPENER.open(f"http://{HOST}:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    return False

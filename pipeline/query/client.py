"""The agent's side of `casemine query`: ask a running `casemine serve`, else search locally, print.

Why its own module, standard library only at import: with a server running, the command's own
start-up is the whole cost of a query. Importing typer, pydantic (the config), numpy or even
`http.client` would take longer than the server takes to answer, so this module reads the few
settings it needs by hand, speaks HTTP/1.1 over a socket and renders hits itself. Without a server
it loads the config and the search modules, still without typer; `--help` and invalid options are
left to the full command, which parses and reports them.

Files a server leaves in its output root (`pipeline.query.files`; written by `pipeline.query.server`):
- `serve.token`: the bearer token every request must carry (mode 0600, new at every start);
- `serve.json`: `{"port", "pid"}`, so a client finds the port without the config.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import time
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

# The server's files, re-exported: callers (and tests) know them as the client's.
from pipeline.query.files import (  # noqa: F401
    HOST,
    SERVER_FILE,
    TOKEN_FILE,
    current_version,
    read_token,
    remove_server_info,
    remove_token,
    server_port,
    write_server_info,
    write_token,
)

MODES = ("dense", "bm25", "hybrid")
# At most this many queries per request (the server's limit): stdin batches go in chunks.
BATCH = 64
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class ServerRejected(Exception):
    """The server refused the request as the caller's mistake (bad filter, too long, no library)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    @property
    def exit_code(self) -> int:
        return 1 if self.status == 404 else 2


# -- HTTP ------------------------------------------------------------------------------------


def http_request(
    port: int, method: str, path: str, token: str | None, body: bytes | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    """One HTTP/1.1 exchange with the loopback server: (status, body). OSError when nobody answers."""
    head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close", "Accept: application/json"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b""))
        raw = _read_all(s)
    header, _, payload = raw.partition(b"\r\n\r\n")
    try:
        status = int(header.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise OSError("not an HTTP answer") from None
    if b"\r\ntransfer-encoding: chunked" in header.lower():
        payload = _dechunk(payload)
    return status, payload


def _read_all(s: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        b = s.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    pos = 0
    while True:
        line_end = data.index(b"\r\n", pos)
        size = int(data[pos:line_end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[line_end + 2 : line_end + 2 + size])
        pos = line_end + 2 + size + 2


def query_remote(
    out_root: Path,
    queries: list[str],
    k: int,
    filters: dict[str, Any] | None,
    mode: str | None,
    port: int | None = None,
    timeout: float = 30.0,
    library: bool = False,
) -> dict[str, Any] | None:
    """Ask the server running for `out_root`; None when there is none, it serves another root, or
    it answered from an older index than `CURRENT` names (the caller then searches locally).
    ServerRejected when the request itself is wrong (the caller reports it)."""
    token = read_token(out_root)
    port = port or server_port(out_root)
    if token is None or port is None:
        return None
    expect = current_version(out_root)
    merged: dict[str, Any] | None = None
    for chunk in (queries[i : i + BATCH] for i in range(0, len(queries), BATCH)):
        body = {
            "queries": chunk,
            "k": k,
            "filters": filters or {},
            "mode": mode,
            "library": library,
            "out": str(Path(out_root).resolve()),
            "expect_version": expect,
        }
        res = _post_query(port, token, body, timeout)
        if res is None or (expect is not None and res.get("index_version") != expect):
            return None
        if merged is None:
            merged = res
        else:
            merged["results"] += res["results"]
    return merged


def _post_query(port: int, token: str, body: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    try:
        status, payload = http_request(
            port, "POST", "/query", token, json.dumps(body, ensure_ascii=False).encode("utf-8"), timeout
        )
        res = json.loads(payload)
    except (OSError, ValueError):
        return None
    if status == 200 and isinstance(res, dict):
        return res
    message = res.get("error") if isinstance(res, dict) else None
    if status in (400, 404, 413, 422) and message:
        raise ServerRejected(status, str(message))
    return None  # 401/403/409 (not our server), 5xx, 503 busy: search locally instead


def wait_until_up(port: int, timeout: float = 60.0) -> bool:
    """True once something answers HTTP on the port (a 401 counts: the server is up)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            http_request(port, "GET", "/health", None, timeout=1.0)
            return True
        except OSError:
            time.sleep(0.2)
    return False


# -- rendering -------------------------------------------------------------------------------


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


# Chinese typography never starts a line with these: the character before moves down with them.
_NO_LINE_START = set("，。、；：！？）」』》〉】”’,.;:!?)%")
_UNITS = re.compile(r"<[A-Z][A-Z_]*>|.", re.S)


def wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` columns (CJK characters count two). Chinese breaks anywhere but
    before closing punctuation; a Latin run is split at a space when one is near."""
    lines: list[str] = []
    for para in (text or "").splitlines() or [""]:
        line = ""
        for ch in _UNITS.findall(para):  # a placeholder such as <PHONE> never breaks
            if display_width(line + ch) > width:
                line, rest = _break(line, ch, width)
                lines.append(line.rstrip(" "))
                line = rest
                if ch == " " and not line:
                    continue
            line += ch
        lines.append(line)
    return lines


def _break(line: str, ch: str, width: int) -> tuple[str, str]:
    """(the finished line, what the next line starts with) when `ch` no longer fits."""
    if ch in _NO_LINE_START and len(line) > 1 and line[-1] not in _NO_LINE_START:
        return line[:-1], line[-1]
    if _latin(ch) and _latin(line[-1:]):  # inside a Latin word: break at its space if one is near
        cut = line.rfind(" ")
        if cut > 0 and display_width(line[cut + 1 :]) < width // 2:
            return line[:cut], line[cut + 1 :]
    return line, ""


def _latin(ch: str) -> bool:
    return len(ch) == 1 and ch.isascii() and not ch.isspace()


def _clip(lines: list[str], n: int, width: int) -> list[str]:
    if len(lines) <= n:
        return lines
    last = lines[n - 1]
    while last and display_width(last) + 1 > width:
        last = last[:-1]
    return lines[: n - 1] + [last + "…"]


def term_width(stream: TextIO) -> int:
    """COLUMNS when set, else the terminal's width, else 80 (piped); kept within 40..120."""
    try:
        cols = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        cols = 0
    if cols <= 0:
        try:
            cols = os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 80
        except (OSError, ValueError, AttributeError):
            cols = 80
    return max(40, min(cols, 120))


def render_query(query: str, result: dict[str, Any], meta: dict[str, Any], width: int) -> str:
    """One query's answer as plain text in `width` columns: a heading, a line when nothing is a
    close match, then per case its id, type, date, similarity, problem, handling and outcome."""
    hits = result.get("hits") or []
    threshold = meta.get("threshold")
    out = wrap(f"query: {' '.join(query.split())}", width)[:3]
    note = f"; sim is cosine, close at {threshold:.2f}+" if threshold is not None else ""
    out += wrap(
        f"{len(hits)} similar case{'s' if len(hits) != 1 else ''}, {meta.get('mode')} ranking, "
        f"index v{meta.get('index_version')}{note}",
        width,
    )
    best = result.get("best_similarity")
    if not hits:
        out.append("no matching cases (check the filters)")
    elif threshold is not None and best is not None and best < threshold:
        out += wrap(
            f"NO CLOSE MATCH: the most similar case has sim {_floor2(best)}; the cases below are only loosely related",
            width,
        )
    for i, h in enumerate(hits, 1):
        out.append("")
        out += _hit_lines(i, h, threshold, width)
    return "\n".join(out)


def _hit_lines(rank: int, h: dict[str, Any], threshold: float | None, width: int) -> list[str]:
    sim = h.get("similarity")
    sim_text = (
        "" if sim is None else f"sim {_floor2(sim)}" + (" weak" if threshold is not None and sim < threshold else "")
    )
    head = f"{rank:>2}. {h.get('case_id') or '-'}  {sim_text}".rstrip()
    facts = "   " + "  ".join(
        x
        for x in (
            h.get("issue_type") or "-",
            h.get("urgency"),
            h.get("date"),
            h.get("channel"),
            h.get("product"),
            h.get("region"),
        )
        if x
    )
    lines = [head] + wrap(facts, width)
    lines += _field_lines("problem", h.get("problem") or "-", width, 3)
    lines += _field_lines("handling", h.get("handling") or "-", width, 3)
    lines += _field_lines("outcome", _outcome(h), width, 2)
    dups = h.get("duplicates") or []
    if dups:
        lines += _field_lines("same as", ", ".join(dups), width, 2)
    return lines


def _floor2(x: float) -> str:
    """Two decimals rounded down, so a case under the threshold never prints as reaching it."""
    return f"{math.floor(x * 100 + 1e-9) / 100:.2f}"


def _outcome(h: dict[str, Any]) -> str:
    outcome = h.get("outcome") or "unknown"
    evidence = (h.get("outcome_evidence") or "").strip()
    return f"{outcome} ({evidence})" if evidence else outcome


def _field_lines(label: str, text: str, width: int, max_lines: int) -> list[str]:
    indent = 13
    body = _clip(wrap(" ".join(text.split()), width - indent), max_lines, width - indent)
    return [f"   {label:<9} {body[0]}"] + [" " * indent + line for line in body[1:]]


def print_results(
    queries: Sequence[str],
    res: dict[str, Any],
    *,
    mode: str,
    k: int,
    filters: dict[str, Any],
    library: bool,
    served_by: str,
    elapsed_ms: float,
    json_out: bool,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> None:
    """What `casemine query` prints: one JSON object per query, or text in the terminal's width."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    meta = {"mode": mode, "index_version": res.get("index_version"), "threshold": res.get("threshold")}
    shown = {k_: v for k_, v in filters.items() if k_ != "case_ids"}
    width = term_width(stdout)
    for n, (q, r) in enumerate(zip(queries, res["results"])):
        if json_out:
            hits = [{"rank": i, **h} for i, h in enumerate(r["hits"], 1)]
            stdout.write(
                json.dumps(
                    {
                        "query": q,
                        "k": k,
                        "mode": mode,
                        "filters": shown,
                        "library": library,
                        "index_version": res.get("index_version"),
                        "served_by": served_by,
                        "elapsed_ms": elapsed_ms,
                        "threshold": res.get("threshold"),
                        "best_similarity": r.get("best_similarity"),
                        "close_match": r.get("close_match"),
                        "results": hits,
                    },
                    ensure_ascii=False,
                    default=str,
                )
                + "\n"
            )
        else:
            stdout.write(("\n" if n else "") + render_query(q, r, meta, width) + "\n")
    stdout.flush()
    if not json_out:
        stderr.write(f"index v{res.get('index_version')}, {served_by}, {elapsed_ms} ms\n")


# -- the fast path of `casemine query` -------------------------------------------------------

_VALUE_OPTS = {
    "-k": "k",
    "--k": "k",
    "--type": "issue_type",
    "--urgency": "urgency",
    "--channel": "channel",
    "--product": "product",
    "--region": "region",
    "--since": "since",
    "--until": "until",
    "--mode": "mode",
    "--out": "out",
    "-o": "out",
    "--port": "port",
    "--config": "config",
    "-c": "config",
}
_FLAGS = {"--json": "json", "--library": "library", "--local": "local"}
_LISTS = ("issue_type", "urgency", "channel", "product", "region")


def parse_args(argv: Sequence[str]) -> dict[str, Any] | None:
    """`casemine query` options, or None for anything this path leaves to the full command
    (`--help`, an unknown option, a value of the wrong type)."""
    opts: dict[str, Any] = {f: [] for f in _LISTS}
    opts.update(query=None, k=5, json=False, library=False, local=False)
    it = iter(argv)
    for arg in it:
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in _FLAGS and not eq:
            opts[_FLAGS[name]] = True
        elif name in _VALUE_OPTS:
            value = inline if eq else next(it, None)
            if value is None:
                return None
            key = _VALUE_OPTS[name]
            if key in _LISTS:
                opts[key].append(value)
            else:
                opts[key] = value
        elif arg.startswith("-") or opts["query"] is not None:
            return None
        else:
            opts["query"] = arg
    try:
        opts["k"] = int(opts["k"])
        opts["port"] = int(opts["port"]) if opts.get("port") is not None else None
    except ValueError:
        return None
    if not 1 <= opts["k"] <= 100 or opts.get("mode") not in (None, *MODES):
        return None
    return opts


def default_out(config: str | None) -> Path | None:
    """`paths.out` of the config the full command would load (same search order), or None if in
    doubt. Read as YAML only: validating the config costs the import of pydantic."""
    candidates = [
        config,
        os.environ.get("CASEMINE_CONFIG"),
        Path.cwd() / "configs" / "casemine.yaml",
        PACKAGE_ROOT / "configs" / "casemine.yaml",
    ]
    source = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if source is None or (config and source != Path(config)):
        return None
    try:
        import yaml

        raw = yaml.load(source.read_text("utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        out = Path((raw.get("paths") or {}).get("out") or "data")
    except Exception:  # noqa: BLE001 - any doubt: the full command reads the config and reports
        return None
    root = source.resolve().parent.parent if source.resolve().parent.name == "configs" else source.resolve().parent
    return out if out.is_absolute() else root / out


def fast_query(argv: Sequence[str], stdin: TextIO | None = None) -> int | None:
    """`casemine query` without typer: through a running server when there is one for the output
    root, else a local search. None for what only the full command handles (`--help`, unknown or
    invalid options): it then parses and reports them itself."""
    t0 = time.perf_counter()
    opts = parse_args(argv)
    if opts is None:
        return None
    queries = [opts["query"]] if opts["query"] else _stdin_queries(stdin)
    if not queries:
        return _error("no query given: pass one as an argument or pipe queries on stdin, one per line", 2)
    filters = {f: opts[f] for f in _LISTS if opts[f]}
    filters.update({f: opts[f] for f in ("since", "until") if opts.get(f)})
    common = dict(
        k=opts["k"], filters=filters, mode=opts.get("mode"), library=opts["library"], json_out=opts["json"], t0=t0
    )
    out = Path(opts["out"]) if opts.get("out") else default_out(opts.get("config"))
    if out is not None and not opts["local"] and read_token(out) is not None:
        try:
            res = query_remote(
                out, queries, opts["k"], filters, opts.get("mode"), port=opts.get("port"), library=opts["library"]
            )
        except ServerRejected as e:
            return _error(str(e), e.exit_code)
        if res is not None:
            return _print(queries, res, served_by="server", **common)
    from pipeline.config import ConfigError, load_config  # the local search needs the full config

    try:
        cfg = load_config(opts.get("config"))
    except ConfigError as e:
        return _error(str(e), 2)
    root = Path(opts["out"]) if opts.get("out") else cfg.resolve(cfg.paths.out)
    return run_query(cfg, root, queries, try_server=False, **common)


def run_query(
    cfg: Any,
    root: Path,
    queries: list[str],
    *,
    k: int,
    filters: dict[str, Any],
    mode: str | None,
    library: bool,
    json_out: bool,
    t0: float,
    try_server: bool = True,
    port: int | None = None,
) -> int:
    """Answer and print `queries` (server first unless told not to, else locally); the exit code."""
    res = None
    if try_server:
        try:
            res = query_remote(
                root,
                queries,
                k,
                filters,
                mode or cfg.search.mode,
                library=library,
                port=port or server_port(root) or cfg.search.serve_port,
            )
        except ServerRejected as e:
            return _error(str(e), e.exit_code)
        if res is not None:
            return _print(
                queries,
                res,
                served_by="server",
                k=k,
                filters=filters,
                mode=mode,
                library=library,
                json_out=json_out,
                t0=t0,
            )
    from pipeline.query.service import QueryService
    from pipeline.retrieval.search import IndexUnavailable, QueryError

    service = QueryService(cfg, root, one_shot=True)
    try:
        res = service.answer(queries, k, filters, mode or cfg.search.mode, library=library)
    except QueryError as e:
        return _error(str(e), 1 if e.status == 404 else 2)
    except IndexUnavailable as e:
        return _error(str(e), 1)
    code = _print(
        queries, res, served_by="local", k=k, filters=filters, mode=mode, library=library, json_out=json_out, t0=t0
    )
    service.finish_one_shot()
    return code


def _print(
    queries: list[str],
    res: dict[str, Any],
    *,
    served_by: str,
    k: int,
    filters: dict[str, Any],
    mode: str | None,
    library: bool,
    json_out: bool,
    t0: float,
) -> int:
    print_results(
        queries,
        res,
        mode=res.get("mode") or mode or "hybrid",
        k=k,
        filters=filters,
        library=library,
        served_by=served_by,
        elapsed_ms=round((time.perf_counter() - t0) * 1000, 1),
        json_out=json_out,
    )
    return 0


def _error(message: str, code: int) -> int:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return code


def _stdin_queries(stdin: TextIO | None) -> list[str]:
    """One query per non-empty stdin line."""
    data = (stdin or sys.stdin).read()
    return [line.strip() for line in data.splitlines() if line.strip()]

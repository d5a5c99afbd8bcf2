"""The files a query server leaves in its output root, read by clients and written by the server
(standard library only: a cold `casemine query` imports this).

- `serve.token`: the bearer token every request must carry (mode 0600, new at every start);
- `serve.json`: `{"port", "pid"}`, so a client finds the port without the config;
- and the index version `index/CURRENT` names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HOST = "127.0.0.1"
TOKEN_FILE = "serve.token"
SERVER_FILE = "serve.json"


def write_token(out_root: Path) -> str:
    """A fresh random token in `<out>/serve.token`, readable by its owner only."""
    import secrets

    token = secrets.token_urlsafe(32)
    _write_private(Path(out_root) / TOKEN_FILE, token + "\n")
    return token


def read_token(out_root: Path) -> str | None:
    try:
        token = (Path(out_root) / TOKEN_FILE).read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None


def remove_token(out_root: Path, token: str) -> None:
    """Delete the token file at shutdown, unless a newer server has replaced it."""
    if read_token(out_root) == token:
        (Path(out_root) / TOKEN_FILE).unlink(missing_ok=True)


def write_server_info(out_root: Path, port: int) -> None:
    _write_private(Path(out_root) / SERVER_FILE, json.dumps({"port": port, "pid": os.getpid()}) + "\n")


def remove_server_info(out_root: Path) -> None:
    """Forget this process's port (another server may have taken the file over: leave that one)."""
    p = Path(out_root) / SERVER_FILE
    try:
        if json.loads(p.read_text("utf-8")).get("pid") == os.getpid():
            p.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def server_port(out_root: Path) -> int | None:
    try:
        port = json.loads((Path(out_root) / SERVER_FILE).read_text("utf-8"))["port"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return port if isinstance(port, int) and 0 < port < 65536 else None


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def current_version(out_root: Path) -> int | None:
    """The version `<out>/index/CURRENT` names (the rule IndexStore uses, without its imports)."""
    try:
        name = (Path(out_root) / "index" / "CURRENT").read_text("utf-8").strip()
    except OSError:
        return None
    return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else None

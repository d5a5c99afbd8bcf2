"""Make sure a Prefect API answers before a flow starts: the configured server or a temporary one.

Why casemine starts Prefect's temporary server itself instead of letting the first flow call do
it: Prefect waits `server.ephemeral.startup_timeout_seconds` (20 s by default) for it and then
raises from inside the flow call, which on a busy 2-core machine lost whole nightly runs. Started
here, the wait is ours (`flow.prefect_startup_timeout_s`), a slow start is retried, and a start
that keeps failing is known *before* any work began, so the caller can run the same steps
without Prefect and say so, instead of losing the night.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.config import FlowConfig

# Read by Prefect at import, so set before any `import prefect`: no telemetry from a machine
# with no network, and a quiet console (the run shows its own progress and summary;
# PREFECT_LOGGING_LEVEL=INFO brings Prefect's lines back).
# Prefect's own start-up wait matters only where it starts the server itself (a flow called from
# Python); `casemine run` starts it first with `flow.prefect_startup_timeout_s`.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}
for _k, _v in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_k, _v)


class PrefectUnavailable(RuntimeError):
    """No Prefect API could be reached or started; the message says why and what to do."""


@dataclass(frozen=True)
class PrefectApi:
    url: str
    temporary: bool  # a server this process started (stopped at exit) rather than a configured one


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile, if any."""
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


def check_server(url: str, timeout_s: float = 10.0) -> None:
    """Raise PrefectUnavailable unless `url`'s health endpoint answers 200."""
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/health", timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as e:
        raise PrefectUnavailable(f"the Prefect server at {url} does not answer ({type(e).__name__})") from None
    if r.status_code != 200:
        raise PrefectUnavailable(f"the Prefect server at {url} answered {r.status_code} to /health")


def ensure_api(flow_cfg: FlowConfig) -> PrefectApi:
    """The API the flow will use, reachable now; PrefectUnavailable after all attempts failed."""
    url = configured_api_url()
    errors: list[str] = []
    for _ in range(flow_cfg.prefect_start_attempts):
        try:
            if url:
                check_server(url)
                return PrefectApi(url, temporary=False)
            return PrefectApi(_start_temporary(flow_cfg.prefect_startup_timeout_s), temporary=True)
        except PrefectUnavailable as e:
            errors.append(str(e))
    raise PrefectUnavailable(f"{errors[-1]} ({len(errors)} attempt(s))")


def _start_temporary(timeout_s: int) -> str:
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    try:
        server.start(timeout=timeout_s)
    except Exception as e:  # Prefect raises RuntimeError with the server's output; keep one line
        server.stop()  # a half-started server must not hold the port for the next attempt
        first = str(e).split(".")[0] or type(e).__name__
        raise PrefectUnavailable(f"Prefect's temporary server did not start within {timeout_s} s: {first}") from None
    return server.api_url

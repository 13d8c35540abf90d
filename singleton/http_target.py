"""The ``http`` target: in sidecar mode, a firing is a request to the application container.

The application gets the firing in ``X-Singleton-*`` headers (the same values a command gets
as ``SINGLETON_*`` variables), so code in any language can fence its writes with the token
and make them idempotent with the run ID. 2xx is success; any other status, a timeout or a
refused connection is a failure, with the status and a bounded excerpt of the body.

The request runs in a worker thread while the firing waits on the context's cancel: when the
lease is lost mid-request the firing stops waiting and records the loss at once; the request
itself is abandoned (a synchronous HTTP call cannot be interrupted) and ends by its timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import httpx

from singleton.context import JobContext
from singleton.targets import Result

#: How much of a failed response's body goes into the ledger's error.
BODY_EXCERPT = 500


def headers_for(ctx: JobContext) -> dict[str, str]:
    """``SINGLETON_JOB`` → ``X-Singleton-Job`` and so on, from the context's env contract."""
    return {
        "X-Singleton-" + "-".join(part.capitalize() for part in key.split("_")[1:]): value
        for key, value in ctx.env().items()
    }


class HttpTarget:
    """A request per firing, through one kept client (connections are reused)."""

    def __init__(
        self,
        url: str,
        *,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        body: str | None = None,
    ) -> None:
        self.url = url
        self.method = method.upper()
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.body = body
        self._client = httpx.Client(timeout=timeout, follow_redirects=False)

    def describe(self) -> str:
        return f"http {self.method} {self.url}"

    def run(self, ctx: JobContext) -> Result:
        outcome: list[Result] = []
        done = threading.Event()

        def request() -> None:
            outcome.append(self._request(ctx))
            done.set()

        ctx.cancel.on_set(lambda reason: done.set())
        threading.Thread(target=request, name=f"http-{ctx.job}", daemon=True).start()
        done.wait()
        if outcome:
            return outcome[0]
        return Result(ok=False, error=f"request abandoned: {ctx.cancel.reason}")

    def _request(self, ctx: JobContext) -> Result:
        try:
            response = self._client.request(
                self.method,
                self.url,
                headers={**self.headers, **headers_for(ctx)},
                content=self.body,
            )
        except httpx.TimeoutException:
            return Result(
                ok=False, error=f"timed out after {self.timeout:g}s: {self.method} {self.url}"
            )
        except httpx.HTTPError as exc:
            return Result(ok=False, error=f"{type(exc).__name__}: {exc}")
        excerpt = response.text[:BODY_EXCERPT]
        if response.is_success:
            return Result(ok=True, output=excerpt)
        return Result(ok=False, error=f"HTTP {response.status_code}: {excerpt}", output=excerpt)

    def close(self) -> None:
        self._client.close()


def from_config(spec: Mapping[str, Any]) -> HttpTarget:
    """An :class:`HttpTarget` from a validated ``http:`` mapping of the config."""
    return HttpTarget(
        spec["url"],
        method=spec.get("method", "POST"),
        headers=spec.get("headers"),
        timeout=spec.get("timeout", 30.0),
        body=spec.get("body"),
    )

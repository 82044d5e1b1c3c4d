"""A small asynchronous client for Prometheus's HTTP API (instant queries).

    async with PrometheusClient("http://prometheus:9090", timeout=5) as prom:
        samples = await prom.query('sum by (le) (rate(x_bucket[1m]))')
        value = await prom.query_value('sum(rate(x_count[1m]))')   # MissingSeries if empty

Errors are typed so the autoscaler can say why it holds its last decision:
PrometheusUnavailable (connection refused, timeout, 5xx, a body that is not the API's JSON),
PrometheusQueryError (Prometheus rejected the query: 400/422 with errorType and error),
MissingSeries (the query is fine but no series matched).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

__all__ = ["PrometheusError", "PrometheusUnavailable", "PrometheusQueryError",
           "MissingSeries", "Sample", "PrometheusClient"]


class PrometheusError(Exception):
    """Any failure to get a usable answer from Prometheus."""


class PrometheusUnavailable(PrometheusError):
    """Prometheus could not be reached or did not answer in time."""


class PrometheusQueryError(PrometheusError):
    """Prometheus rejected the query."""

    def __init__(self, query: str, error_type: str, error: str) -> None:
        super().__init__(f"query {query!r} rejected ({error_type}): {error}")
        self.query, self.error_type, self.error = query, error_type, error


class MissingSeries(PrometheusError):
    """The query matched no series."""

    def __init__(self, query: str) -> None:
        super().__init__(f"no series for {query!r}")
        self.query = query


@dataclass(frozen=True)
class Sample:
    """One series of an instant vector (or a scalar, with no labels)."""

    labels: dict[str, str]
    value: float


class PrometheusClient:
    """Instant queries against one Prometheus server."""

    def __init__(self, base_url: str, *, timeout: float = 5.0,
                 session: aiohttp.ClientSession | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"prometheus URL must be http(s)://host[:port][/path], "
                             f"got {base_url!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> PrometheusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def query(self, promql: str, *, at: float | None = None) -> list[Sample]:
        """Evaluates `promql` now (or at the unix time `at`); returns its samples."""
        # Prometheus durations take integer units only ("2500ms", not "2.5s")
        form = {"query": promql, "timeout": f"{max(1, round(self.timeout * 1000))}ms"}
        if at is not None:
            form["time"] = f"{at:.3f}"
        url = f"{self.base_url}/api/v1/query"
        try:
            async with self._client().post(
                    url, data=form,
                    timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                status = response.status
                try:
                    body = await response.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    body = None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise PrometheusUnavailable(f"prometheus at {self.base_url} unreachable: "
                                        f"{type(e).__name__}: {e}") from e
        if not isinstance(body, dict):
            raise PrometheusUnavailable(f"prometheus at {self.base_url} answered HTTP {status} "
                                        f"without the API's JSON")
        if body.get("status") != "success":
            error_type = str(body.get("errorType", "unknown"))
            error = str(body.get("error", ""))
            if status in (400, 422) or error_type in ("bad_data", "execution"):
                raise PrometheusQueryError(promql, error_type, error)
            raise PrometheusUnavailable(f"prometheus at {self.base_url} failed (HTTP {status}, "
                                        f"{error_type}): {error}")
        return _samples(promql, body.get("data") or {})

    async def query_value(self, promql: str, *, at: float | None = None) -> float:
        """The value of a query that yields one series or a scalar; MissingSeries when it
        yields none (a NaN, e.g. 0/0, also counts as missing)."""
        samples = await self.query(promql, at=at)
        if not samples or math.isnan(samples[0].value):
            raise MissingSeries(promql)
        if len(samples) > 1:
            raise PrometheusQueryError(promql, "cardinality",
                                       f"expected one series, got {len(samples)}")
        return samples[0].value


def _samples(promql: str, data: dict) -> list[Sample]:
    result_type, result = data.get("resultType"), data.get("result")
    if result_type in ("scalar", "string"):
        return [Sample({}, float(result[1]))]
    if result_type != "vector":
        raise PrometheusQueryError(promql, "unsupported",
                                   f"an instant query must give a vector or scalar, "
                                   f"got {result_type!r}")
    return [Sample(dict(item.get("metric") or {}), float(item["value"][1]))
            for item in result or []]

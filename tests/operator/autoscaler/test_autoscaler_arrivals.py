"""The autoscaler's arrival signal counts requests refused for want of room (outcome
"rejected": demand) and leaves out invalid ones (outcome "invalid": a flood of bad requests is
no reason to scale up). The router, prefill and decode workers' real metrics, scraped by a
real Prometheus, read by read_observation."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import yaml
from prometheus_client import start_http_server

from baton.operator.autoscaler.metrics import read_observation
from baton.operator.autoscaler.prometheus import (
    MissingSeries,
    PrometheusClient,
    PrometheusUnavailable,
)
from baton.workers.metrics import BatonMetrics, MetricLabels

NS, MODEL = "llm", "nano"
WINDOW_S = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def scraped(tmp_path):
    """Router, prefill and decode metrics (one exporter each), scraped every second by a
    real Prometheus; yields (metrics by role, Prometheus URL)."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.path.exists(binary):
        pytest.fail("the Prometheus server is not installed: run `make tools`")
    metrics, servers, targets = {}, [], []
    for role, pool in (("router", ""), ("prefill", "fast"), ("decode", "fast")):
        m = metrics[role] = BatonMetrics(MetricLabels(NS, MODEL, role, pool))
        port = _free_port()
        servers.append(start_http_server(port, addr="127.0.0.1", registry=m.registry))
        targets.append(f"127.0.0.1:{port}")
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "baton", "honor_labels": True,
                            "static_configs": [{"targets": targets}]}]}))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield metrics, f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for server, thread in servers:
            server.shutdown()
            thread.join(5)


async def _observe(prom: PrometheusClient):
    try:
        return await read_observation(prom, NS, MODEL, ttft_target=1.0, itl_target=0.1,
                                      window_seconds=WINDOW_S)
    except (MissingSeries, PrometheusUnavailable):  # not up or not scraped yet
        return None


async def _eventually(check, what: str, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s  # bounds a hang only
    while (value := await check()) is None or not value[0]:
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last {value!r}"
        await asyncio.sleep(0.5)  # a bounded poll for the asserted state
    return value[1]


async def test_arrivals_count_rejections_for_room_but_not_invalid_requests(scraped):
    metrics, url = scraped
    router = metrics["router"]
    async with PrometheusClient(url) as prom:
        async def seen_zero():
            obs = await _observe(prom)
            return None if obs is None else (obs.arrival_rate == 0.0, obs)

        await _eventually(seen_zero, "every series, with no arrivals")
        # A flood of invalid requests: no arrivals.
        for _ in range(1000):
            router.request_finished("invalid")
        invalid_seen = await prom.query(
            f'sum(baton_requests_total{{namespace="{NS}",outcome="invalid"}})')

        async def scraped_invalid():
            got = await prom.query(
                f'sum(baton_requests_total{{namespace="{NS}",outcome="invalid"}})')
            return (bool(got) and got[0].value == 1000.0, got)

        await _eventually(scraped_invalid, "the invalid requests scraped")
        # Then 10 requests refused for want of room: demand, seen as arrivals.
        for _ in range(10):
            router.request_finished("rejected")

        async def arrivals():
            obs = await _observe(prom)
            return None if obs is None else (obs.arrival_rate > 0, obs)

        obs = await _eventually(arrivals, "the rejected requests as arrivals")
        # 10 in a 10 s window is about 1 request/s (extrapolated at the window's edges); the
        # 1000 invalid ones, counted, would make it about 100.
        assert 0 < obs.arrival_rate < 5, (obs, invalid_seen)

"""The state-transfer benchmark runs one short round on the CPU as its own process (the
receiver is a spawned process, as in a real run), so the GPU run does not find a broken script
and every row of the report is a measured rate."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "transfer" / "bench_transfer.py"

pytestmark = pytest.mark.timeout(300)


def test_bench_transfer_reports_three_measured_paths(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--requests", "1", "--rounds", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "transfer failed" not in out.stderr
    (report,) = tmp_path.glob("*-transfer.md")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-.+-transfer\.md", report.name)
    text = report.read_text()
    rows = [line for line in text.splitlines()
            if re.match(r"\| (gRPC transfer|raw TCP socket|floor)", line)]
    assert len(rows) == 3, text
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        rate, cpu_per_gb = float(cells[1]), float(cells[3])
        assert rate > 0 and cpu_per_gb > 0, row
    assert re.search(r"gRPC / raw TCP: \*\*\d+%\*\*", text)
    assert "XXH3-64" in text

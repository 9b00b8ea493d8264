"""The benchmark works end to end: ``python -m bench --smoke`` (every case for about a second).

It is a benchmark, not a test of speed: CI only checks that it still starts everything, logs
in, measures every case and prints the table a maintainer reads. It needs ``wrk`` and ``nginx``
(Debian packages ``wrk`` and ``nginx-light``, installed by ``.ci/run``); without them the bench
fails with the package to install, and so does this test.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_proc import gateway_config, start_gateway
from tests.support.peers import free_port
from tests.support.upstream import running_upstream

REPO = Path(__file__).resolve().parents[2]
OURS = "oidc-gateway"
DIRECT = "direct upstream"
SIGNED_IN_GET = "GET 64 B, signed in"
# Every case of the table, and whether it also runs against the upstream directly.
CASES = {
    SIGNED_IN_GET: True,
    "GET 1 MB, signed in": True,
    "POST 10 MB upload, signed in": True,
    "GET, no session, browser (302 to provider)": False,
    "GET, no session, API (401)": False,
    "full login flow": False,
}


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def _first_table(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(case title, target) → cells of the first Markdown table; a blank title repeats."""
    rows: dict[tuple[str, str], list[str]] = {}
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| case | target |"))
    title = ""
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        title = cells[0] or title
        # "full login flow (median of 3)": keyed without the count
        key = title.split(" (median of")[0]
        rows[(key, cells[1])] = cells[2:]
    return rows


@pytest.mark.timeout(400)
def test_smoke_run_measures_every_case() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke"], cwd=REPO, capture_output=True, text=True,
        timeout=360, check=False, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    table = _first_table(done.stdout)

    for case, has_direct in CASES.items():
        targets = [OURS, DIRECT] if has_direct else [OURS]
        for target in targets:
            assert (case, target) in table, f"no row for {case} / {target}:\n{done.stdout}"
            rps = table[(case, target)][0]
            assert not rps.startswith("n/a"), f"{case} / {target} did not run: {rps}"
            assert _number(rps) > 0, f"{case} / {target}: {rps} req/s"

    # req/s, p50, p99, errors, ratio to direct, CPU per request: the signed-in GET had no error
    # of any kind (a lost session would show as a body-check failure here).
    _, p50, p99, errors, ratio, _cpu = table[(SIGNED_IN_GET, OURS)]
    assert errors == "0", f"signed-in GET through the gateway: errors {errors}"
    assert 0 < _number(p50) <= _number(p99)
    assert ratio.endswith("x")
    assert _number(ratio[:-1]) > 0

    assert "peak RSS (VmHWM" in done.stdout
    assert "bytes per session" in done.stdout, done.stdout


@pytest.mark.provider
@pytest.mark.timeout(200)
@pytest.mark.parametrize(("store", "workers"), [("memory", 1), ("redis", 2)])
def test_side_by_side_tool_measures_both_trees(
    oidc_provider: Any, store: str, workers: int
) -> None:
    """``python -m bench.ab`` (one change, measured side by side) starts each tree's gateway,
    checks its answer and reports both variants' CPU per request. Smoke only: the same tree
    twice, one 1-second slice each, the 302 case (it needs the provider to be loaded), with
    sessions in memory and, with two workers, in a redis-server of the tool's own (the 302
    checks the store). Four connections: a smoke run on a machine busy with the rest of the
    suite must not time out."""
    port = free_port()
    client_id, client_secret = oidc_provider.register_client(
        [f"http://127.0.0.1:{port}/oauth2/callback"])
    done = subprocess.run(
        [sys.executable, "-m", "bench.ab", str(REPO), str(REPO), "--case", "redirect",
         "--rounds", "1", "--seconds", "1", "--port", str(port), "--store", store,
         "--workers", str(workers), "--connections", "4",
         "--provider", oidc_provider.issuer, "--client-id", client_id,
         "--client-secret", client_secret, "--upstream", "http://127.0.0.1:9"],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"bench.ab failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    where = "redis://127.0.0.1:" if store == "redis" else "the memory store"
    assert f"ab: sessions in {where}" in done.stdout, done.stdout
    assert f"server.workers {workers}\n" in done.stdout, done.stdout
    measured = re.findall(r"^ab: ([AB]) .*: ([\d,.]+) µs CPU/req over ([\d,]+) requests$",
                          done.stdout, re.MULTILINE)
    assert [name for name, _, _ in measured] == ["A", "B"], done.stdout
    for _, cpu, count in measured:
        assert _number(cpu) > 0
        assert _number(count) > 0
    assert "ab: B ÷ A = " in done.stdout


@pytest.mark.provider
@pytest.mark.timeout(120)
async def test_hop_tool_times_each_hop_of_a_login(oidc_provider: Any, tmp_path: Path) -> None:
    """``python -m bench.hops`` logs in through a gateway (here ours, with the test OP) and
    prints each hop's median, the gateway's and the provider's share, and with ``--idle`` the
    answer times back to back and after idling. Smoke only: two logins, five requests."""
    port = free_port()
    client_id, secret = oidc_provider.register_client(
        [f"http://127.0.0.1:{port}/oauth2/callback"])
    async with running_upstream() as upstream:
        gw = await start_gateway(gateway_config(
            port=port, issuer=oidc_provider.issuer, client_id=client_id,
            client_secret=secret, upstream=upstream.url), directory=tmp_path)
        try:
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "bench.hops", gw.url, "--logins", "2", "--idle",
                 "--requests", "5", "--gap", "5", "--path", "/anything"],
                cwd=REPO, capture_output=True, text=True, timeout=100, check=False,
                stdin=subprocess.DEVNULL)
        finally:
            gw.stop()
    assert done.returncode == 0, f"bench.hops failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in done.stdout.splitlines() if line.startswith("| "))}
    for hop in ("gateway GET /anything", "gateway GET /oauth2/callback", "all gateway hops",
                "all provider hops", "whole login", "302, back to back",
                "302, after 5 ms idle", "401, back to back", "401, after 5 ms idle"):
        assert hop in rows, f"no row {hop!r}:\n{done.stdout}"
        assert _number(rows[hop][0]) > 0, done.stdout
    assert any(name.startswith("provider ") for name in rows), done.stdout
    whole = _number(rows["whole login"][0])
    assert _number(rows["all gateway hops"][0]) < whole, done.stdout

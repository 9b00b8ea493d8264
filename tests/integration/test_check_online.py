"""`oidc-gateway check --online` reaches the real provider and the real Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.gateway_proc import free_port, gateway_config

ROOT = Path(__file__).resolve().parents[2]


def run_check(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--online", "-c", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )


@pytest.mark.redis
@pytest.mark.provider
def test_check_online_ok_when_provider_and_redis_answer(
    oidc_provider: Any, redis_target: Any, tmp_path: Path
) -> None:
    config = gateway_config(
        port=free_port(), issuer=oidc_provider.issuer, client_id="c", client_secret="s",
        upstream="http://127.0.0.1:9", store="redis", redis_url=redis_target.url,
    )
    done = run_check(config, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_check_online_names_what_cannot_be_reached(tmp_path: Path) -> None:
    dead_idp = f"http://127.0.0.1:{free_port()}"
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    config = gateway_config(
        port=free_port(), issuer=dead_idp, client_id="c", client_secret="s",
        upstream="http://127.0.0.1:9", store="redis", redis_url=dead_redis,
    )
    done = run_check(config, tmp_path)
    assert done.returncode == 2
    assert "provider:" in done.stderr
    assert dead_idp in done.stderr
    assert "session.store:" in done.stderr
    assert "Traceback" not in done.stderr

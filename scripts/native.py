"""The native stack, for machines without Docker: ``python -m scripts.native run``.

Starts (or checks) PostgreSQL and RabbitMQ with its management plugin, runs SeaweedFS as the
S3 endpoint, applies the migrations, then runs gateway, storage and indexer in the foreground
until Ctrl-C / SIGTERM, and stops everything it started. Tests and benchmarks use ``Stack``.
Exit status: 0 after Ctrl-C / SIGTERM; 1 when the stack could not start (one line says why)
or when one of its processes died (the rest are stopped); 2 for a port setting that is not one.

``run`` reads ``MINIPACS_GATEWAY_PORT`` / ``MINIPACS_GATEWAY_AET`` like the gateway, ``--data``
(or ``MINIPACS_DATA``, default ``.data``), and, so that a second stack on the machine does not
collide with the first: ``MINIPACS_NATIVE_S3_PORT`` (SeaweedFS S3 port, default 8333; it also
uses the next 6 ports and their +10000 gRPC twins), ``MINIPACS_NATIVE_DATABASE`` (PostgreSQL
database, default ``minipacs``) and ``MINIPACS_NATIVE_VHOST`` (RabbitMQ vhost, default ``/``).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
SEAWEEDFS_CONFIG = ROOT / "deploy" / "seaweedfs"  # master.toml: weed reads it from its cwd
SERVICES = ("gateway", "storage", "indexer", "mover")


def wait_for(what: str, check: object, timeout: float = 60.0, every: float = 0.2) -> None:
    """Poll ``check()`` until it returns truthy or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except RuntimeError:
            raise  # the thing we wait for has died: no point waiting on
        except Exception as exc:
            last = exc
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}" + (f": {last}" if last else ""))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    """Free for a server: nothing listens on it (TIME_WAIT leftovers don't count, as servers
    set SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


EPHEMERAL_START = 32768  # Linux's default ip_local_port_range starts here


def free_port_block(size: int = 8) -> int:
    """A base port P with P..P+size and their gRPC twins P+10000.. all free (SeaweedFS opens
    both). Both runs stay below the kernel's ephemeral range, so neither a client socket nor
    ``free_port()`` (which the kernel picks from that range) can take one of them meanwhile."""
    for _ in range(200):
        base = random.randrange(20000, EPHEMERAL_START - 10000 - size)
        if all(_bindable(p) and _bindable(p + 10000) for p in range(base, base + size)):
            return base
    raise RuntimeError("no free block of ports for SeaweedFS")


def _psql(sql: str, db: str = "postgres") -> str:
    cmd = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-tAc", sql]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def ensure_postgres() -> None:
    if port_open(5432):
        return
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions:
        raise RuntimeError("PostgreSQL is not installed: run scripts/setup.sh")
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main",
                    "start"], check=False)
    wait_for("PostgreSQL on 127.0.0.1:5432", lambda: port_open(5432), 60)


BROKER_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"  # compose mounts it
BROKER_PLUGINS = ROOT / "deploy" / "rabbitmq" / "enabled_plugins"  # and this one
# The Debian broker reads every ``*.conf`` of its conf.d after rabbitmq.conf (3.10 and later)
DEBIAN_BROKER_CONF = Path("/etc/rabbitmq/conf.d/90-minipacs.conf")
# What the services rely on that a Debian broker's defaults lack (see ``ensure_rabbitmq``)
NATIVE_BROKER_KEYS = ("consumer_timeout",)
_broker_tuned = False


def broker_conf_value(key: str) -> str:
    """A setting of ``deploy/rabbitmq/rabbitmq.conf``: one source for compose and native."""
    for line in BROKER_CONF.read_text(encoding="utf-8").splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.lstrip().startswith("#") and name.strip() == key:
            return value.strip()
    raise KeyError(f"{key} is not set in {BROKER_CONF}")


def broker_plugins() -> list[str]:
    """The plugins ``deploy/rabbitmq/enabled_plugins`` enables (an Erlang list: ``[a,b].``)."""
    text = BROKER_PLUGINS.read_text(encoding="utf-8").strip()
    if not (text.startswith("[") and text.endswith("].")):
        raise ValueError(f"{BROKER_PLUGINS} is not an Erlang list of plugin names")
    return [name.strip() for name in text[1:-2].split(",") if name.strip()]


def native_broker_conf() -> str:
    """The Debian broker's drop-in file: ``NATIVE_BROKER_KEYS`` with the values compose's
    ``deploy/rabbitmq/rabbitmq.conf`` gives them."""
    lines = [f"# minipacs: from {BROKER_CONF.relative_to(ROOT)}, written by make run and make test",
             "# (scripts/native.py) so that it outlives a restart of the broker."]
    lines += [f"{key} = {broker_conf_value(key)}" for key in NATIVE_BROKER_KEYS]
    return "\n".join(lines) + "\n"


def persist_broker_conf(path: Path = DEBIAN_BROKER_CONF) -> bool:
    """Write ``native_broker_conf()`` to ``path`` unless it is there already, so the settings
    outlive a restart of the broker. False (and one line on stderr) when it cannot be written:
    the settings then hold on the running broker only, until it restarts."""
    text = native_broker_conf()
    try:
        if path.exists() and path.read_text(encoding="utf-8") == text:
            return True
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"minipacs: cannot write {path} ({exc.strerror}): the broker keeps "
              f"{', '.join(NATIVE_BROKER_KEYS)} until it restarts", file=sys.stderr, flush=True)
        return False
    return True


def ensure_rabbitmq() -> None:
    global _broker_tuned
    if not port_open(5672):
        subprocess.run(["rabbitmq-server", "-detached"], check=False)
        wait_for("RabbitMQ on 127.0.0.1:5672", lambda: port_open(5672), 120, 0.5)
    if not _broker_tuned:
        # compose's plugins: the dashboard, and the shovel behind its "Move messages" (dead
        # letters back to their work queue); already enabled ones are left as they are
        subprocess.run(["rabbitmq-plugins", "enable", *broker_plugins()], check=False,
                       capture_output=True, timeout=120)
        wait_for("RabbitMQ management on :15672", lambda: port_open(15672), 60, 0.5)
        # The one broker setting the services rely on that a Debian broker lacks: in a
        # drop-in file for the broker's next start, and on the running node (channels opened
        # from now on), which read its files before.
        persist_broker_conf()
        timeout = int(broker_conf_value("consumer_timeout"))
        subprocess.run(["rabbitmqctl", "-q", "eval",
                        f"application:set_env(rabbit, consumer_timeout, {timeout})."],
                       check=True, capture_output=True, timeout=60)
        _broker_tuned = True


def _ident(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def ensure_database(name: str, role: str = "minipacs") -> str:
    name, role = _ident(name), _ident(role)
    if _psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'") != "1":  # noqa: S608
        _psql(f"CREATE ROLE {role} LOGIN")
    if _psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != "1":  # noqa: S608
        _psql(f"CREATE DATABASE {name} OWNER {role}")
    return f"postgresql://{role}@127.0.0.1:5432/{name}"


def drop_database(name: str) -> None:
    _psql(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")


def ensure_vhost(vhost: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], capture_output=True, check=False)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*",
                    ".*"], capture_output=True, check=True)


def drop_vhost(vhost: str, attempts: int = 3) -> None:
    """Deletes ``vhost`` (gone already is fine). A broker that fails to delete it is retried,
    then named on stderr: a vhost left behind keeps its queues' messages on the broker."""
    out = ""
    for _ in range(attempts):
        proc = subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost],
                              capture_output=True, text=True, check=False)
        out = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0 or "does not exist" in out:
            return
    print(f"native: could not delete RabbitMQ vhost {vhost!r}: {out}", file=sys.stderr)


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else (shutil.which("weed") or "weed")


@dataclass
class StackConfig:
    base_dir: Path
    gateway_port: int = 11112
    gateway_aet: str = "MINIPACS"
    s3_port: int = 8333
    database: str = "minipacs"
    vhost: str = "/"
    extra_env: dict[str, str] = field(default_factory=dict)
    log_to_files: bool = False


class Stack:
    """SeaweedFS + migrations + the minipacs services as child processes."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self.env: dict[str, str] = {}

    # -- the environment every service gets ----------------------------------------------
    def service_env(self) -> dict[str, str]:
        c = self.config
        vhost = "%2F" if c.vhost == "/" else c.vhost
        env = {
            **os.environ,
            "MINIPACS_AMQP_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
            "MINIPACS_DATABASE_URL": f"postgresql://minipacs@127.0.0.1:5432/{c.database}",
            "MINIPACS_S3_ENDPOINT": f"127.0.0.1:{c.s3_port}",
            "MINIPACS_S3_ACCESS_KEY": "minipacs",
            "MINIPACS_S3_SECRET_KEY": "minipacs-secret",
            "MINIPACS_S3_BUCKET": "minipacs",
            "MINIPACS_SPOOL_DIR": str(c.base_dir / "spool"),
            "MINIPACS_GATEWAY_PORT": str(c.gateway_port),
            "MINIPACS_GATEWAY_AET": c.gateway_aet,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        env.update(c.extra_env)
        return env

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str],
               cwd: Path = ROOT) -> None:
        if self.config.log_to_files:
            log = (self.config.base_dir / f"{name}.log").open("ab")
            self._logs[name] = log
            proc = subprocess.Popen(argv, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                    cwd=cwd)
        else:
            proc = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, cwd=cwd)
            threading.Thread(target=_prefix, args=(name, proc.stdout), daemon=True).start()
        self.procs[name] = proc

    def log_text(self, name: str) -> str:
        path = self.config.base_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- start / stop ---------------------------------------------------------------------
    def start_s3(self) -> None:
        c = self.config
        data = c.base_dir / "s3"
        data.mkdir(parents=True, exist_ok=True)
        p = c.s3_port
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "minipacs",
               "AWS_SECRET_ACCESS_KEY": "minipacs-secret"}
        self._spawn("s3", [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1",
                           "-ip.bind=127.0.0.1", f"-s3.port={p}", f"-master.port={p + 1}",
                           f"-volume.port={p + 2}", f"-filer.port={p + 3}",
                           f"-admin.port={p + 4}", f"-s3.port.iceberg={p + 5}",
                           f"-s3.metricsPort={p + 6}", "-s3.port.lance=0", "-admin.ui=false",
                           "-webdav=false"], env, cwd=SEAWEEDFS_CONFIG)
        proc = self.procs["s3"]

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {proc.returncode}: "
                                   f"{self.log_text('s3')[-500:]}")
            return _http_up(f"http://127.0.0.1:{p}/")

        wait_for("SeaweedFS S3", up, 90)

    def prepare(self) -> None:
        c = self.config
        busy = [p for p in (c.gateway_port, c.s3_port) if not _bindable(p)]
        if busy:
            raise RuntimeError(f"port(s) {busy} already in use on 127.0.0.1: is another "
                               "minipacs (or another DICOM server / S3 store) running?")
        c.base_dir.mkdir(parents=True, exist_ok=True)
        ensure_postgres()
        ensure_rabbitmq()
        ensure_database(c.database)
        if c.vhost != "/":
            ensure_vhost(c.vhost)
        self.env = self.service_env()
        self.start_s3()
        subprocess.run([sys.executable, "-m", "services.migrate", "up"], env=self.env,
                       check=True, cwd=ROOT)

    def heartbeat_file(self, name: str) -> str:
        return str(self.config.base_dir / f"{name}.alive")

    def start_service(self, name: str, replica: int = 1,
                      env: Mapping[str, str] | None = None) -> str:
        """Start a service; ``replica`` > 1 starts another process of it beside the first
        (named ``<name>-<replica>``), as ``docker compose up --scale <name>=N`` does. ``env``
        overrides the stack's environment for this process."""
        proc_name = name if replica == 1 else f"{name}-{replica}"
        env = {**self.env, **(env or {}),
               "MINIPACS_HEARTBEAT_FILE": self.heartbeat_file(proc_name)}
        self._spawn(proc_name, [sys.executable, "-m", f"services.{name}"], env)
        return proc_name

    def start(self) -> Stack:
        self.prepare()
        for name in SERVICES:
            self.start_service(name)

        def gateway_up() -> bool:
            self.check_running("during start-up")
            return port_open(self.config.gateway_port)

        wait_for("gateway port", gateway_up, 60)
        return self

    def exited(self) -> list[tuple[str, int]]:
        """(name, exit status) of every started process that has ended."""
        return [(name, rc) for name, proc in self.procs.items()
                if (rc := proc.poll()) is not None]

    def check_running(self, when: str) -> None:
        """Raise ``RuntimeError`` if a started process has ended (its log says why)."""
        gone = self.exited()
        if gone:
            raise RuntimeError(", ".join(f"{name} exited with {rc}" for name, rc in gone)
                               + f" {when}; its log is above")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(30)

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "s3"] + (["s3"] if "s3" in self.procs else []):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in list(self.procs.values()):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()
        for log in self._logs.values():
            log.close()


def _http_up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)  # noqa: S310 - loopback only
    except urllib.error.HTTPError:
        return True  # S3 answers 403 to an anonymous GET: it is up
    return True


def _prefix(name: str, stream: IO[bytes] | None) -> None:
    if stream is None:
        return
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"{name:8} | {line.decode(errors='replace')}")
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.native")
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--data", default=os.environ.get("MINIPACS_DATA", str(ROOT / ".data")))
    args = parser.parse_args(argv)
    env = os.environ
    try:
        config = StackConfig(
            base_dir=Path(args.data),
            gateway_port=port_from_env(env, "MINIPACS_GATEWAY_PORT", 11112),
            gateway_aet=env.get("MINIPACS_GATEWAY_AET", "MINIPACS"),
            s3_port=port_from_env(env, "MINIPACS_NATIVE_S3_PORT", StackConfig.s3_port),
            database=env.get("MINIPACS_NATIVE_DATABASE", StackConfig.database),
            vhost=env.get("MINIPACS_NATIVE_VHOST", StackConfig.vhost))
    except ValueError as exc:
        print(f"minipacs: cannot start: {exc}", file=sys.stderr, flush=True)
        return 2
    stack = Stack(config)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    status = 0
    try:
        try:
            stack.start()
        except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
            # what went wrong, in one line (the services' own logs are above it)
            print(f"minipacs: cannot start: {exc}; stopping", file=sys.stderr, flush=True)
            return 1
        print(f"minipacs is up: DICOM {stack.config.gateway_aet}@127.0.0.1:"
              f"{stack.config.gateway_port}, queue dashboard http://127.0.0.1:15672 "
              "(guest/guest). Ctrl-C stops it.", flush=True)
        while not stopping.is_set():
            for name, rc in stack.exited():
                # a supervisor (systemd's Restart=on-failure) must see that this was no stop
                print(f"{name} exited with {rc}; stopping", flush=True)
                stopping.set()
                status = 1
            stopping.wait(1)
    finally:
        stack.stop()
    return status


def port_from_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{name}={raw!r} is not a TCP port")
    return int(raw)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""minipacs as the server under test: a fresh native stack of its own (database, vhost,
ports, S3 directory), started once per bench run and stopped (and dropped) at the end."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import asyncpg
import psutil

from bench.cpu import CpuMeter, postgres_for, rabbitmq, tree
from bench.servers import Server
from scripts.native import (
    Stack,
    StackConfig,
    drop_database,
    drop_vhost,
    free_port,
    free_port_block,
)


class IndexCounter:
    """``SELECT count(*) FROM instance`` over one persistent connection."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(dsn))

    def count(self) -> int:
        return int(self.loop.run_until_complete(
            self.conn.fetchval("SELECT count(*) FROM instance")))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


class Minipacs(Server):
    name = "minipacs"
    aet = "MINIPACS"

    def __init__(self, base: Path) -> None:
        tag = f"bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.stack = Stack(StackConfig(
            base_dir=base / "minipacs",
            gateway_port=free_port(),
            gateway_aet=self.aet,
            s3_port=free_port_block(),
            database=f"minipacs_{tag}",
            vhost=f"minipacs_{tag}",
            log_to_files=True,
            extra_env={"MINIPACS_ALLOW_LIST": "false"},
        ))
        self.port = self.stack.config.gateway_port
        self.counter: IndexCounter | None = None
        self.before = 0
        self.started = False

    def open(self) -> None:
        self.started = True
        self.stack.start()
        db = self.stack.config.database
        self.counter = IndexCounter(f"postgresql://minipacs@127.0.0.1:5432/{db}")

    def begin(self, work: Path) -> None:
        for name, proc in self.stack.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"minipacs {name} exited with {proc.returncode}: see "
                                   f"{self.stack.config.base_dir / (name + '.log')}")
        assert self.counter is not None
        self.before = self.counter.count()

    def processes(self) -> list[tuple[str, psutil.Process]]:
        """Every process of the stack, by component (``s3`` is SeaweedFS)."""
        out: list[tuple[str, psutil.Process]] = []
        for name, proc in self.stack.procs.items():
            try:
                root = psutil.Process(proc.pid)
            except psutil.Error:
                continue
            out += [(name, p) for p in tree([root])]
        out += [("rabbitmq", p) for p in rabbitmq()]
        out += [("postgres", p) for p in postgres_for(self.stack.config.database)]
        return out

    def meter(self) -> CpuMeter:
        # the selector walks every process on the machine: sample less often than the peers
        return CpuMeter(self.processes, every=1.0)

    def indexed_after(self, t0: float, acked: int, deadline: float) -> float | None:
        assert self.counter is not None
        target = self.before + acked
        until = time.monotonic() + deadline
        while time.monotonic() < until:
            if self.counter.count() >= target:
                return time.monotonic() - t0
            time.sleep(0.02)
        return None

    def end(self) -> None:
        pass

    def close(self) -> None:
        if self.counter is not None:
            try:
                self.counter.close()
            except Exception as exc:  # the stack is going away anyway
                print(f"closing the index connection: {exc}")
            self.counter = None
        if self.started:
            self.started = False
            self.stack.stop()
            drop_database(self.stack.config.database)
            drop_vhost(self.stack.config.vhost)

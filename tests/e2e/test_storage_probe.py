"""Storage writes to its bucket once before it consumes anything (``shared/s3.py``
``probe_write``): a bucket it may read but not write stops it at start-up with S3's reason,
instead of every instance retrying for ever later (exit 1, one line saying why, no
traceback); with good credentials it starts and leaves no object behind. The S3 store is
SeaweedFS with a second, read-only identity."""

from __future__ import annotations

import subprocess
from pathlib import Path

from scripts.native import Stack
from shared import s3
from tests.conftest import make_stack, s3_client, teardown
from tests.helpers import wait_until

WEED = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "weed")


def add_reader(stack: Stack, access: str, secret: str) -> None:
    """A SeaweedFS identity that may read and list, not write (``weed shell s3.configure``)."""
    master = f"127.0.0.1:{stack.config.s3_port + 1}"
    command = (f"s3.configure -user=reader -access_key={access} -secret_key={secret} "
               "-actions=Read,List -apply\n")
    done = subprocess.run([WEED, "shell", f"-master={master}"], input=command,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and access in done.stdout, done.stdout + done.stderr


def log_of(stack: Stack, name: str) -> str:
    return (stack.config.base_dir / f"{name}.log").read_text(errors="replace")


def test_storage_refuses_a_bucket_it_cannot_write_and_leaves_no_probe(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, "probe", MINIPACS_STARTUP_TIMEOUT="3")
    try:
        stack.prepare()
        admin = s3_client(stack)
        s3.ensure_bucket(admin, "minipacs")
        add_reader(stack, "readonlykey", "readonlysecret")

        # read-only credentials: the bucket is there and readable, but storage must not start
        stack.env = {**stack.env, "MINIPACS_S3_ACCESS_KEY": "readonlykey",
                     "MINIPACS_S3_SECRET_KEY": "readonlysecret"}
        stack.start_service("storage")
        proc = stack.procs["storage"]
        wait_until(lambda: proc.poll() is not None, timeout=60,
                   what="storage to give up on a bucket it cannot write")
        assert proc.returncode == 1
        text = log_of(stack, "storage")
        assert "write probe" in text and "AccessDenied" in text, text[-2000:]
        assert "storage consuming" not in text
        # the end, in one line that says what it waited for and why it gave up
        last = text.strip().splitlines()[-1]
        assert "ERROR" in last and "gave up waiting for S3 (bucket, and a write probe)" in last \
            and "AccessDenied" in last, text[-2000:]
        assert "Traceback" not in text, text[-2000:]
        del stack.procs["storage"]

        # the service's own credentials: it starts, and the probe object is gone again
        stack.env = {**stack.env, "MINIPACS_S3_ACCESS_KEY": "minipacs",
                     "MINIPACS_S3_SECRET_KEY": "minipacs-secret"}
        stack.start_service("storage")
        wait_until(lambda: "storage consuming" in log_of(stack, "storage"), timeout=60,
                   what="storage to start consuming")
        assert stack.procs["storage"].poll() is None
        assert list(admin.list_objects("minipacs", recursive=True)) == []
    finally:
        teardown(stack)

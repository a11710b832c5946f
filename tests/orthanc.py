"""A real Orthanc (Debian's /usr/sbin/Orthanc) for interoperability tests and benchmarks.

    orthanc = start_orthanc(tmp_path, "ORTHANC1", {"minipacs": ["MINIPACS", "127.0.0.1", port]})
    try:
        orthanc.rest("POST", "/modalities/minipacs/query", {"Level": "Study", "Query": {...}})
    finally:
        orthanc.stop()

Free ports for HTTP and DICOM, its own storage and index folders, TCP_NODELAY=1 (as for DCMTK),
no plugins, no authentication; its log goes to ``<workdir>/orthanc.log``.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.native import free_port
from tests.helpers import wait_until

ORTHANC = "/usr/sbin/Orthanc"


@dataclass
class Orthanc:
    aet: str
    url: str           # REST base URL, no trailing slash
    dicom_port: int
    http_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        """Call the REST API; JSON in and out (raw bytes when the answer is not JSON)."""
        data = None if body is None else (body if isinstance(body, bytes)
                                          else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def log_text(self) -> str:
        path = self.workdir / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_orthanc(workdir: Path, aet: str, modalities: Mapping[str, Any],
                  extra_config: Mapping[str, Any] | None = None, timeout: float = 60
                  ) -> Orthanc:
    """Start Orthanc with DICOM AE title ``aet`` and ``DicomModalities`` = ``modalities``
    (Orthanc's own format: ``{"name": [AET, host, port]}``). Returns once REST answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config = {
        "Name": aet,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomModalities": dict(modalities),
        "Plugins": [],
        "HttpTimeout": 60,
        "DicomScuTimeout": 30,
        "StableAge": 1,
        **(extra_config or {}),
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    log = (workdir / "orthanc.log").open("ab")
    proc = subprocess.Popen([ORTHANC, "--verbose", str(path)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=workdir,
                            env={**os.environ, "TCP_NODELAY": "1"})
    orthanc = Orthanc(aet, f"http://127.0.0.1:{http_port}", dicom_port, http_port, workdir, proc)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"Orthanc exited ({proc.returncode}):\n{orthanc.log_text()}")
        try:
            return bool(orthanc.rest("GET", "/system", timeout=2))
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_until(ready, timeout, what=f"Orthanc {aet} REST on :{http_port}")
    except BaseException:
        orthanc.stop()
        raise
    return orthanc

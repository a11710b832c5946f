"""The spool: where received bytes become durable before we acknowledge them.

    incoming/   pynetdicom writes each arriving dataset here (one temp file per C-STORE)
    ready/      fsynced files referenced by an ``instance.received`` message (claim check)
    rejected/   files whose message the broker did not confirm; storage can still rescue one
                if the message turns up after all, else the sweeper removes it

Durability of ``ready/`` is that of the disk under it (a named volume in compose). File names
are random UUIDs: never derived from a tag value.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1024 * 1024
log = logging.getLogger("minipacs.spool")


@dataclass(frozen=True)
class Spooled:
    name: str
    sha256: str
    size: int


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.ready = root / "ready"
        self.rejected = root / "rejected"
        self._ready = str(self.ready)  # the commit path joins strings: pathlib costs more here

    def create(self) -> Spool:
        for d in (self.incoming, self.ready, self.rejected):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def commit(self, path: Path) -> Spooled:
        """Hash and fsync ``path`` (which must be on the spool's filesystem), move it to
        ``ready/`` under a random name and fsync the directory. Returns what the message needs."""
        sha = hashlib.sha256()
        size = 0
        with path.open("rb") as fp:
            while chunk := fp.read(_CHUNK):
                sha.update(chunk)
                size += len(chunk)
            os.fsync(fp.fileno())
        name = f"{uuid.uuid4().hex}.dcm"
        os.replace(path, os.path.join(self._ready, name))
        _fsync_dir(self._ready)
        return Spooled(name, sha.hexdigest(), size)

    def path_of(self, name: str) -> Path | None:
        """The ready (or rescued rejected) file behind a message's ``spool_name``, if any."""
        if not name or "/" in name or "\\" in name or name.startswith("."):
            return None
        for folder in (self.ready, self.rejected):
            candidate = folder / name
            if candidate.exists():
                return candidate
        return None

    def reject(self, name: str) -> None:
        try:
            os.replace(self.ready / name, self.rejected / name)
        except FileNotFoundError:
            pass

    def remove(self, name: str) -> None:
        for folder in (self.ready, self.rejected):
            try:
                os.unlink(folder / name)
            except FileNotFoundError:
                continue

    def sweep(self, older_than: float) -> int:
        """Remove abandoned temp files (aborted transfers) and unconfirmed rejects."""
        cutoff = time.time() - older_than
        removed = 0
        for folder in (self.incoming, self.rejected):
            for entry in os.scandir(folder):
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue  # nothing the gateway writes: leave it to a person
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:  # one file we may not remove must not stop the rest
                    log.warning("spool sweeper could not remove %s: %s", entry.path,
                                exc.strerror or exc)
        return removed

"""The spool: where received bytes become durable before we acknowledge them.

    incoming/   pynetdicom writes each arriving dataset here (one temp file per C-STORE)
    ready/      fsynced files referenced by an ``instance.received`` message (claim check);
                beside each, a ``.pending`` marker until the broker has confirmed its publish
                (a second hard link to the file, named ``<file>.<note in hex>.pending``)
    rejected/   files set aside: ready files that no longer read as the instance the gateway
                checked (and, from older versions, files whose publish was not confirmed);
                the sweeper removes them
    retrieve/   C-GET's temp files, one folder per gateway process (``shared.scratch``: the
                gateways remove a dead process's folder)

Durability of ``ready/`` is that of the disk under it (a named volume in compose). File names
are random UUIDs: never derived from a tag value. A marker's name adds the gateway's note (the
calling AE title and host, not a tag value) in hexadecimal, so it cannot steer a path either.

Why the marker is a hard link and not a small file: it costs no inode, where a file marker
was one more inode allocated and freed per instance. On ext4 without a journal (this project's
test machines), creating a file skips, one by one, the inodes freed in the last minutes, so
every freed inode makes the creates after it slower (``docs/benchmarks-history.md``, session
18). A filesystem that refuses hard links gets an empty marker file of the same name instead.

A gateway that stops between ``commit`` and the broker's answer, or a publish that got no
answer (no confirm in time, the connection lost), leaves a ``ready/`` file whose message may or
may not be queued, and its marker says so. Storage's sweeper re-announces such files
(``unconfirmed``) once they are older than any confirm could take: the consumers are
idempotent, so a second message for a file already queued costs one redundant delivery, and a
file nobody announced gets stored instead of filling the disk. A publish the broker refused
(``basic.nack``) leaves nothing: the file is removed at once.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shared.lifecycle import StartupFailed

_CHUNK = 1024 * 1024
PENDING = ".pending"  # suffix of the marker beside a ready file whose publish is unanswered
NOTE_MAX = 100  # bytes of note a marker's name carries (in hex; longer notes are left out)
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS)
log = logging.getLogger("minipacs.spool")


@dataclass(frozen=True)
class Spooled:
    name: str
    sha256: str
    size: int
    marker: str  # what ``settle`` removes once the broker has answered


def marker_name(name: str, note: bytes) -> str:
    """The marker of the ready file ``name``: the note (who sent it) travels in its name."""
    return f"{name}.{note.hex() if len(note) <= NOTE_MAX else ''}{PENDING}"


def parse_marker(marker: str) -> tuple[str, bytes | None] | None:
    """``(ready file name, note)`` of a marker's name; note ``None`` for a marker written by an
    earlier version (``<file>.pending``, the note inside); ``None`` for anything else."""
    if not marker.endswith(PENDING):
        return None
    stem = marker[: -len(PENDING)]
    if stem.endswith(".dcm"):
        return stem, None
    name, dot, hexnote = stem.rpartition(".")
    if not dot or not name.endswith(".dcm"):
        return None
    try:
        return name, bytes.fromhex(hexnote)
    except ValueError:
        return name, b""


@dataclass(frozen=True)
class Unconfirmed:
    """A ready file whose publish the broker never answered (or its gateway stopped first)."""

    name: str
    note: bytes  # what the gateway put in the marker (who sent it); b"" if it was lost
    marked_at: float
    marker: str


def _digest(fp: BinaryIO) -> tuple[str, int]:
    sha = hashlib.sha256()
    size = 0
    while chunk := fp.read(_CHUNK):
        sha.update(chunk)
        size += len(chunk)
    return sha.hexdigest(), size


def file_digest(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file, read in chunks."""
    with path.open("rb") as fp:
        return _digest(fp)


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
        self._links = True  # False once the filesystem refused a hard link

    def create(self) -> Spool:
        """The spool's directories, then a small file written, fsynced and removed in
        ``incoming/``: a spool the service cannot write stops it at start-up with the reason
        (``StartupFailed``), instead of failing every C-STORE later. A probe left by a crash
        is a staging leftover, which the sweeper removes."""
        try:
            for d in (self.incoming, self.ready, self.rejected):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.incoming / f"probe-{uuid.uuid4().hex}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"minipacs spool probe")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            raise StartupFailed(f"the spool directory {self.root} is not usable: "
                                f"{type(exc).__name__}: {exc}") from exc
        return self

    def commit(self, path: Path, note: bytes = b"") -> Spooled:
        """Hash and fsync ``path`` (which must be on the spool's filesystem), move it to
        ``ready/`` under a random name beside its ``.pending`` marker (holding ``note``) and
        fsync the directory. Returns what the message needs; call ``settle`` once the broker
        has answered the publish."""
        with path.open("rb") as fp:
            sha256, size = _digest(fp)
            os.fsync(fp.fileno())
        name = f"{uuid.uuid4().hex}.dcm"
        marker = marker_name(name, note)
        # the marker first: a ready file the directory's fsync makes durable always has one
        self._mark(path, os.path.join(self._ready, marker))
        os.replace(path, os.path.join(self._ready, name))
        _fsync_dir(self._ready)  # one fsync makes both entries durable
        return Spooled(name, sha256, size, marker)

    def _mark(self, path: Path, marker: str) -> None:
        if self._links:
            try:
                os.link(path, marker)
                return
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                self._links = False
                log.warning("the spool's filesystem refuses hard links (%s): pending markers "
                            "are empty files from now on", exc.strerror or exc)
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    def settle(self, marker: str) -> None:
        """The broker answered the publish behind ``marker`` (confirmed, or refused and the
        file removed): drop the marker. Losing this unlink in a crash only costs a redundant
        re-announcement."""
        if "/" in marker or not marker.endswith(PENDING):
            raise ValueError(f"not a marker name: {marker!r}")
        try:
            os.unlink(os.path.join(self._ready, marker))
        except FileNotFoundError:
            pass

    def unconfirmed(self, older_than: float) -> list[Unconfirmed]:
        """Markers older than ``older_than`` seconds: the broker never answered their publish
        (or their gateway stopped first). A marker whose ready file is gone (consumed, or
        removed) is dropped here."""
        cutoff = time.time() - older_than
        found: list[Unconfirmed] = []
        for entry in os.scandir(self.ready):
            parsed = parse_marker(entry.name)
            if parsed is None or not entry.is_file(follow_symlinks=False):
                continue
            name, note = parsed
            try:
                marked_at = entry.stat(follow_symlinks=False).st_mtime
                if marked_at >= cutoff:
                    continue
                if not os.path.isfile(os.path.join(self._ready, name)):
                    self.settle(entry.name)
                    continue
                if note is None:  # an earlier version's marker: a small file holding the note
                    with open(entry.path, "rb") as fp:
                        note = fp.read(4096)
            except FileNotFoundError:
                continue  # settled meanwhile
            found.append(Unconfirmed(name, note, marked_at, entry.name))
        return found

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

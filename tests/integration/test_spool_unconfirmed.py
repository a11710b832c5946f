"""Spool files a gateway left without the broker's answer (``shared/spool.py``), on a real
directory: the ``.pending`` marker ``Spool.commit`` links beside each ready file, ``settle``
once the broker answered, ``unconfirmed`` listing the markers a stopped gateway left, and
``shared.ingest.recover`` rebuilding the message the gateway would have published.

The storage sweeper publishing the rebuilt message on a live stack is in
``tests/e2e/test_poison_and_sweep.py``; here its two refusals: a broker it cannot publish to
(the file and its marker stay for the next round) and a file that no longer reads as DICOM.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection

from services.storage.worker import StorageWorker
from shared import broker, s3
from shared.dicom import InvalidInstance
from shared.ingest import Caller, Ingest, recover
from shared.messages import InstanceReceived
from shared.settings import StorageSettings
from shared.spool import PENDING, Spool, marker_name, parse_marker
from tests.dicomgen import CT_IMAGE, make_instance, uid

HOUR = 3600.0
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CALLER = Caller("CT_ROOM_3", "127.0.0.7")


@pytest.fixture()
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool").create()


@pytest.fixture()
def dicom(tmp_path: Path) -> Path:
    return make_instance(tmp_path / "ct.dcm", sop_class=CT_IMAGE, sop_uid=uid("unconf", 1),
                         study_uid=uid("unconf", "st"), series_uid=uid("unconf", "se"),
                         patient_id="UNCONF", patient_name="Un^Confirmed", rows=16, cols=16,
                         modality="CT", instance_number=1)


def staged(spool: Spool, source: Path, n: int = 0) -> Path:
    """A copy of ``source`` where the gateway receives datasets (the spool's filesystem)."""
    path = spool.incoming / f"tmp{n}-{source.name}"
    shutil.copyfile(source, path)
    return path


def markers(spool: Spool) -> list[str]:
    return sorted(p.name for p in spool.ready.iterdir() if p.name.endswith(PENDING))


def age(spool: Spool, marker: str, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(spool.ready / marker, (when, when))


def test_the_marker_lives_from_commit_until_the_broker_answers(spool: Spool, dicom: Path
                                                               ) -> None:
    seen: list[list[str]] = []

    def confirmed(message: InstanceReceived) -> None:
        seen.append(markers(spool))  # while the publish waits for its confirm

    def refused(message: InstanceReceived) -> None:
        seen.append(markers(spool))
        raise broker.PublishFailed("basic.nack", refused=True)

    ok = Ingest(spool, confirmed).accept_file(staged(spool, dicom), CT_IMAGE, uid("unconf", 1),
                                              EXPLICIT_LE, CALLER)
    no = Ingest(spool, refused).accept_file(staged(spool, dicom, 1), CT_IMAGE,
                                            uid("unconf", 1), EXPLICIT_LE, CALLER)

    assert ok.ok and no.kind == "unavailable"
    assert [len(m) for m in seen] == [1, 1]
    assert markers(spool) == []  # settled either way
    assert len(list(spool.ready.iterdir())) == 1  # the confirmed file, for storage
    assert list(spool.rejected.iterdir()) == []  # the refused one removed at once
    assert list(spool.incoming.iterdir()) == []
    assert spool.unconfirmed(0) == []


def test_a_publish_without_an_answer_leaves_the_file_for_the_sweeper(spool: Spool, dicom: Path
                                                                     ) -> None:
    """No confirm in time, or the connection lost mid-publish: the message may be queued, so
    the file and its marker stay, exactly as after a gateway that stopped there."""
    def unanswered(message: InstanceReceived) -> None:
        raise broker.PublishFailed("no publisher confirm within 10s")

    def connection_lost(message: InstanceReceived) -> None:
        raise ConnectionResetError("connection lost")

    for n, publish in enumerate((unanswered, connection_lost)):
        outcome = Ingest(spool, publish).accept_file(staged(spool, dicom, n), CT_IMAGE,
                                                     uid("unconf", 1), EXPLICIT_LE, CALLER)
        assert outcome.kind == "unavailable"
    assert len(markers(spool)) == 2
    names = [parse_marker(m)[0] for m in markers(spool)]  # type: ignore[index]
    assert all((spool.ready / name).exists() for name in names)
    for marker in markers(spool):
        age(spool, marker, 2 * HOUR)
    assert sorted(item.name for item in spool.unconfirmed(HOUR)) == sorted(names)


def test_a_stopped_gateways_file_is_found_and_its_message_rebuilt(spool: Spool, dicom: Path
                                                                  ) -> None:
    published: list[InstanceReceived] = []
    Ingest(spool, published.append).accept_file(staged(spool, dicom), CT_IMAGE,
                                                uid("unconf", 1), EXPLICIT_LE, CALLER)
    # What a gateway killed after the commit, before the broker's answer, leaves behind:
    left = spool.commit(staged(spool, dicom, 1), b'{"aet": "CT_ROOM_3", "host": "127.0.0.7"}')

    assert spool.unconfirmed(HOUR) == []  # a fresh marker: its gateway may still be waiting
    age(spool, left.marker, 2 * HOUR)
    [item] = spool.unconfirmed(HOUR)
    assert item.name == left.name

    message = recover(spool, item)

    expected = published[0]
    assert message.spool_name == left.name != expected.spool_name
    assert message.sha256 == left.sha256 == expected.sha256
    assert (message.size, message.sop_instance_uid, message.sop_class_uid,
            message.study_instance_uid, message.series_instance_uid, message.transfer_syntax,
            message.calling_aet, message.peer_host) == \
        (expected.size, expected.sop_instance_uid, expected.sop_class_uid,
         expected.study_instance_uid, expected.series_instance_uid, expected.transfer_syntax,
         "CT_ROOM_3", "127.0.0.7")


def test_the_marker_is_a_second_link_to_the_file_not_a_new_inode(spool: Spool, dicom: Path
                                                                  ) -> None:
    """No inode per marker: on ext4 without a journal, freeing one per instance made every
    later create in the spool slower (``shared/spool.py``)."""
    left = spool.commit(staged(spool, dicom), b'{"aet": "CT_ROOM_3"}')
    ready, marker = spool.ready / left.name, spool.ready / left.marker
    assert os.stat(ready).st_ino == os.stat(marker).st_ino
    assert os.stat(ready).st_nlink == 2
    spool.settle(left.marker)
    assert not marker.exists() and os.stat(ready).st_nlink == 1


def test_a_marker_without_a_note_still_gets_its_message(spool: Spool, dicom: Path) -> None:
    left = spool.commit(staged(spool, dicom), b"x" * 500)  # too long to travel in a name
    assert parse_marker(left.marker) == (left.name, b"")
    age(spool, left.marker, 2 * HOUR)
    [item] = spool.unconfirmed(HOUR)
    message = recover(spool, item)
    assert (message.sha256, message.calling_aet) == (left.sha256, "")


def test_an_earlier_versions_marker_file_is_still_found_with_its_note(spool: Spool,
                                                                      dicom: Path) -> None:
    """Before session 18 the marker was a small file ``<file>.pending`` holding the note: one
    left by a gateway stopped before an upgrade is still announced, with its sender."""
    left = spool.commit(staged(spool, dicom))
    spool.settle(left.marker)
    old = spool.ready / (left.name + PENDING)
    old.write_bytes(b'{"aet": "CT_ROOM_3", "host": "127.0.0.7"}')
    age(spool, old.name, 2 * HOUR)
    [item] = spool.unconfirmed(HOUR)
    assert (item.name, item.marker) == (left.name, old.name)
    assert recover(spool, item).calling_aet == "CT_ROOM_3"
    spool.settle(item.marker)
    assert markers(spool) == [] and (spool.ready / left.name).exists()


def test_a_filesystem_without_hard_links_gets_marker_files(spool: Spool, dicom: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    def refused(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refused)
    left = spool.commit(staged(spool, dicom), b'{"aet": "CT_ROOM_3", "host": "127.0.0.7"}')
    monkeypatch.undo()
    assert "refuses hard links" in caplog.text
    marker = spool.ready / left.marker
    assert marker.stat().st_size == 0 and (spool.ready / left.name).stat().st_nlink == 1
    age(spool, left.marker, 2 * HOUR)
    [item] = spool.unconfirmed(HOUR)
    assert recover(spool, item).calling_aet == "CT_ROOM_3"
    second = spool.commit(staged(spool, dicom, 1))  # no second try at linking
    assert (spool.ready / second.name).stat().st_nlink == 1


def test_marker_names_carry_the_note_in_hex_and_nothing_else() -> None:
    hostile = b'{"aet": "../../etc", "host": "a/b\\c\x00"}'
    name = marker_name("0123abcd.dcm", hostile)
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert parse_marker(name) == ("0123abcd.dcm", hostile)
    assert parse_marker("0123abcd.dcm.pending") == ("0123abcd.dcm", None)  # an earlier version's
    assert parse_marker("0123abcd.dcm.zz.pending") == ("0123abcd.dcm", b"")
    assert parse_marker("0123abcd.dcm") is None
    assert parse_marker("notes.txt.pending") is None


def test_a_marker_whose_file_was_consumed_is_dropped(spool: Spool, dicom: Path) -> None:
    """The message did reach the broker before the gateway stopped, and storage has already
    stored the file and removed it: nothing to announce, the marker goes."""
    left = spool.commit(staged(spool, dicom))
    spool.remove(left.name)
    age(spool, left.marker, 2 * HOUR)
    assert spool.unconfirmed(HOUR) == []
    assert list(spool.ready.iterdir()) == []


def test_a_file_that_no_longer_reads_as_dicom_is_refused(spool: Spool, dicom: Path) -> None:
    left = spool.commit(staged(spool, dicom))
    (spool.ready / left.name).write_bytes(b"not what the gateway checked")
    age(spool, left.marker, 2 * HOUR)
    [item] = spool.unconfirmed(HOUR)
    with pytest.raises(InvalidInstance):
        recover(spool, item)



async def test_the_storage_sweeper_keeps_what_it_cannot_announce_and_rejects_what_is_damaged(
        spool: Spool, dicom: Path, connection: AbstractRobustConnection) -> None:
    """Storage's sweeper with a publisher that is not open (as while the broker is away): the
    file and its marker stay for the next round, nothing is lost. A damaged file goes to
    ``rejected/`` (the sweeper's usual collection) with an error in the log."""
    settings = StorageSettings.from_env({}, spool_dir=spool.root, sweep_after=HOUR,
                                        s3_endpoint="127.0.0.1:9", cache_mb=1)
    worker = StorageWorker(settings, spool, s3.client(settings),
                           broker.Publisher(connection, 10), asyncio.Event())
    damaged = spool.commit(staged(spool, dicom))
    (spool.ready / damaged.name).write_bytes(b"\0" * 300)
    age(spool, damaged.marker, 2 * HOUR)
    assert await worker.recover_unconfirmed() == 0
    assert not (spool.ready / damaged.name).exists()
    assert (spool.rejected / damaged.name).exists()
    assert markers(spool) == []

    waiting = spool.commit(staged(spool, dicom, 1))
    age(spool, waiting.marker, 2 * HOUR)
    assert await worker.recover_unconfirmed() == 0  # publisher not open: PublishFailed
    assert (spool.ready / waiting.name).exists()
    assert markers(spool) == [waiting.marker]

"""Headers that once cost memory or an instance, end to end: a deflated instance that inflates
to a gigabyte, and text values with a NUL character inside. Each is acknowledged, stored
byte-identical, indexed once and findable, with the gateway's and storage's memory bounded
(RELIABILITY: "bounded memory", "acknowledged => durable", "no false success")."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.native import Stack
from tests.conftest import dsn
from tests.dicomgen import (
    DEFLATED,
    ENCAPSULATED_PDF,
    Made,
    document_parts,
    uid,
    write_part10,
)
from tests.e2e.test_find import findscu
from tests.e2e.test_ingest import assert_stored_byte_identical, indexed
from tests.e2e.test_large import RSS_LIMIT, RssSampler
from tests.helpers import pg, send_as_is, storescu, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

GIB = 1 << 30
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def document(folder: Path, tag: str) -> Made:
    return Made(folder / f"{tag}.dcm", f"{tag.upper()}-PAT", uid(tag, "study"),
                uid(tag, "series"), uid(tag, "sop"))


def test_a_deflated_instance_inflating_to_a_gigabyte_is_stored_with_memory_bounded(
        stack: Stack, tmp_path: Path) -> None:
    """1 GiB of zeros in its Encapsulated Document deflates to about a megabyte: a small file
    for the sender, a gigabyte for whoever inflates it whole, as pydicom does."""
    made = document(tmp_path, "deflatedbomb")
    write_part10(made.path, ENCAPSULATED_PDF, made.sop_uid, DEFLATED,
                 document_parts(made, b"BOMB^PATIENT", GIB))
    assert made.path.stat().st_size < 4 << 20
    port = stack.config.gateway_port
    with RssSampler({name: stack.procs[name].pid for name in ("gateway", "storage")}) as rss:
        send_as_is(port, [made.path], ENCAPSULATED_PDF, DEFLATED)  # asserts Success
        wait_until(lambda: indexed(stack, [made.study_uid]) == 1, timeout=120,
                   what="the deflated instance indexed")
    print(f"\nresident memory, most seen: gateway {rss.max['gateway'] / 1e6:.0f} MB, "
          f"storage {rss.max['storage'] / 1e6:.0f} MB ({rss.samples} samples)")
    assert rss.max["gateway"] < RSS_LIMIT and rss.max["storage"] < RSS_LIMIT, rss.max
    assert_stored_byte_identical(stack, [made])
    row = pg(dsn(stack), "SELECT transfer_syntax, header->'00420011' AS doc FROM instance "
             "WHERE sop_instance_uid = $1", made.sop_uid)[0]
    assert row["transfer_syntax"] == DEFLATED
    assert row["doc"] == '{"vr": "OB", "BulkDataURI": ""}'


def test_nul_characters_inside_text_values_do_not_keep_an_instance_out_of_the_index(
        stack: Stack, tmp_path: Path) -> None:
    """PostgreSQL's text and jsonb hold no NUL: such a value once dead-lettered the
    instance's index message, after the sender had its Success."""
    made = document(tmp_path, "nulname")
    write_part10(made.path, ENCAPSULATED_PDF, made.sop_uid, EXPLICIT_LE,
                 document_parts(made, b"NUL\x00NAME^PATIENT", 1000))
    port = stack.config.gateway_port
    result = storescu(port, [made.path])
    assert (result.successes, result.failures) == (1, 0), result.output
    wait_until(lambda: indexed(stack, [made.study_uid]) == 1, timeout=60,
               what="the instance with a NUL in its patient name indexed")
    found = findscu(port, ["QueryRetrieveLevel=STUDY", f"PatientID={made.patient_id}",
                           "PatientName", "StudyInstanceUID"])
    assert found.final == "Success", found.output
    assert [(str(r.PatientName), r.StudyInstanceUID) for r in found.responses] == [
        ("NULNAME^PATIENT", made.study_uid)]
    assert "NUL characters dropped" in stack.log_text("indexer")

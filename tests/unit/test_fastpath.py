"""The gateway's hand-made encoders produce exactly pynetdicom's / pydicom's bytes."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode

from services.gateway.fastpath import copy_contexts, file_meta, store_response

CT = "1.2.840.10008.5.1.4.1.1.2"
UIDS = ["1.2.3", "1.2.3.4", "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"]


@pytest.mark.parametrize("sop", UIDS)
@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                "1.2.840.10008.1.2.4.50"])
def test_file_meta_is_what_pydicom_writes(sop: str, ts: str) -> None:
    expected = BytesIO()
    write_file_meta_info(expected, create_file_meta(  # type: ignore[arg-type]
        sop_class_uid=CT, sop_instance_uid=sop, transfer_syntax=ts))
    assert file_meta(CT, sop, ts) == expected.getvalue()


@pytest.mark.parametrize("sop", UIDS)
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000, 0x0124, 0xFFFF])
@pytest.mark.parametrize("msg_id", [1, 2, 65535])
def test_store_response_is_what_pynetdicom_encodes(sop: str, status: int, msg_id: int) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = sop
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    assert store_response(CT, sop, msg_id, status) == encode(msg.command_set, True, True)


def test_copied_contexts_are_equal_and_independent() -> None:
    from pynetdicom import AllStoragePresentationContexts, build_context

    original = [build_context(cx.abstract_syntax, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
                for cx in AllStoragePresentationContexts[:20]]
    copied = copy_contexts(original)
    assert [(c.abstract_syntax, c.transfer_syntax, c.as_scu, c.as_scp) for c in copied] == \
        [(c.abstract_syntax, c.transfer_syntax, c.as_scu, c.as_scp) for c in original]
    copied[0].context_id = 7
    copied[0].add_transfer_syntax("1.2.840.10008.1.2.2")
    assert original[0].context_id is None
    assert "1.2.840.10008.1.2.2" not in original[0].transfer_syntax
    assert copy_contexts({"a": [1]}) == {"a": [1]}

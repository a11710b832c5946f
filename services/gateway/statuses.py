"""Every DIMSE status the gateway answers, by name (PS3.4 Annex B, C and GG)."""

from __future__ import annotations

SUCCESS = 0x0000
# Query/Retrieve (C-FIND). The failure codes are shared with C-STORE's below, which keep their
# names in describe(): these are aliases with the C-FIND meaning.
PENDING = 0xFF00                   # one match follows
CANCEL = 0xFE00                    # matching stopped on C-CANCEL
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # no / unknown QueryRetrieveLevel, a level the model lacks
UNABLE_TO_PROCESS = 0xC000         # the identifier cannot be decoded
# C-MOVE / C-GET
SUBOPERATIONS_UNABLE = 0xA702      # no sub-operation could be done (no mover, all failed)
MOVE_DESTINATION_UNKNOWN = 0xA801  # the Move Destination is not a known node
SUBOPERATIONS_WARNING = 0xB000     # some sub-operations failed or warned: see the failed list
# C-STORE failures
OUT_OF_RESOURCES = 0xA700          # we could not make it durable: the modality should retry
DATASET_DOES_NOT_MATCH = 0xA900    # dataset UIDs differ from the command's
CANNOT_UNDERSTAND = 0xC000         # unparsable, truncated
INVALID_UID = 0xC001               # missing or malformed SOP Instance/Class, Study, Series UID
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122   # Affected SOP Class UID is not the presentation context's
NOT_AUTHORIZED = 0x0124            # the calling node may not use this service (Allow* = false)
RESOURCE_LIMITATION = 0x0213       # N-ACTION: the request could not be made durable (broker)

FOR_INVALID_INSTANCE = {
    "unreadable": CANNOT_UNDERSTAND,
    "missing_uid": INVALID_UID,
    "mismatch": DATASET_DOES_NOT_MATCH,
}


def describe(status: int) -> str:
    names = {v: k for k, v in globals().items() if k.isupper() and isinstance(v, int)}
    return f"0x{status:04X} {names.get(status, '').replace('_', ' ').lower()}".strip()

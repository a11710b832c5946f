"""Building the pynetdicom application entity and its server (TCP_NODELAY on every socket)."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from services.gateway import fastpath, reactor
from shared.settings import GatewaySettings

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, HTJ2KLossless,
    HTJ2KLosslessRPCL, HTJ2K, RLELossless,
]

FIND_MODELS = [PatientRootQueryRetrieveInformationModelFind,
               StudyRootQueryRetrieveInformationModelFind]


class NoDelayServer(ThreadedAssociationServer):
    """Sets TCP_NODELAY on accepted sockets: without it every DIMSE round trip waits ~40 ms
    for a delayed ACK."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address


class SharedPortServer(NoDelayServer):
    """One of several gateway processes listening on the same port (``workers.py``)."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def build_ae(settings: GatewaySettings) -> AE:
    # Received datasets go straight to a temp file in the spool (bounded memory), never to RAM.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # C-GET sub-operations stream the stored file as it is: no decode / re-encode in pydicom,
    # no silent transfer syntax conversion.
    _config.STORE_SEND_CHUNKED_DATASET = True
    fastpath.install()
    reactor.install()  # pynetdicom's threads wait for work instead of polling every 1 ms
    # pynetdicom's standard handlers format every PDU and DIMSE message for its logger: only
    # worth it when that logger shows them (TRACE); otherwise they would also turn off the
    # hand-encoded C-STORE response (fastpath).
    tracing = logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)
    _config.LOG_HANDLER_LEVEL = "standard" if tracing else "none"
    # Its C-FIND / C-MOVE / C-GET service classes decode and format every request identifier
    # for that logger whatever its level (a tenth of the gateway's time per C-FIND), and the
    # identifiers hold patient data: only under TRACE.
    _config.LOG_REQUEST_IDENTIFIERS = tracing
    _config.LOG_RESPONSE_IDENTIFIERS = tracing
    ae = AE(ae_title=settings.gateway_aet)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.require_called_aet = False  # decided by admission.admit, which also logs why
    ae.add_supported_context(Verification, TRANSFER_SYNTAXES[:4])
    ae.add_supported_context(StorageCommitmentPushModel, TRANSFER_SYNTAXES[:4])
    for find_model in FIND_MODELS:
        ae.add_supported_context(find_model, TRANSFER_SYNTAXES[:4])
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


def start(ae: AE, settings: GatewaySettings, handlers: list[Any]) -> ThreadedAssociationServer:
    server = ae.make_server((settings.gateway_host, settings.gateway_port),
                            evt_handlers=handlers, server_class=SharedPortServer
                            if settings.gateway_processes > 1 else NoDelayServer)
    thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True)
    thread.start()
    ae._servers.append(server)  # so server.shutdown() can deregister it, as start_server does
    return server

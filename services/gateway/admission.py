"""Who may open an association: called-AE check and the calling-AE / host allow-list (pure)."""

from __future__ import annotations

import functools
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from shared.settings import Node

# (result, source, diagnostic) of A-ASSOCIATE-RJ, PS3.8 9.3.4
REJECT_CALLED_AET = (0x01, 0x01, 0x07)   # permanent, called AE title not recognised
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, calling AE title not recognised
REJECT_NO_CONTEXT = (0x01, 0x01, 0x01)   # permanent, no reason given (PS3.8 9.3.2 asks for
                                         # one or more presentation contexts; DCMTK: 0006:0110)


@dataclass(frozen=True)
class Decision:
    accept: bool
    reason: str = ""
    reject: tuple[int, int, int] = (0, 0, 0)


@functools.lru_cache(maxsize=256)
def _addresses(host: str) -> frozenset[str]:
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset({host})


def host_matches(node_host: str, peer_host: str,
                 resolve: functools._lru_cache_wrapper[frozenset[str]] | None = None) -> bool:
    if node_host in ("*", peer_host):
        return True
    return peer_host in (resolve or _addresses)(node_host)


def permitted(operation: str, calling_aet: str, peer_host: str, allow_list: bool,
              check_host: bool, nodes: Mapping[str, Node]) -> bool:
    """May this caller use ``operation`` (echo / store / find / move / get)? With the allow-list
    off every caller may; with it on, a node matching the caller must allow it (Orthanc's
    ``AllowEcho``, ``AllowStore``, ``AllowFind``, ``AllowMove``, ``AllowGet``)."""
    if not allow_list:
        return True
    calling = calling_aet.strip()
    return any(n.may(operation) for n in nodes.values()
               if n.aet == calling and (not check_host or host_matches(n.host, peer_host)))


def admit(calling_aet: str, called_aet: str, peer_host: str, our_aet: str,
          require_called_aet: bool, allow_list: bool, check_host: bool,
          nodes: Mapping[str, Node], proposed: int = 1) -> Decision:
    """``proposed``: how many presentation contexts the A-ASSOCIATE-RQ carries."""
    calling = calling_aet.strip()
    if proposed < 1:
        return Decision(False, "no presentation context proposed", REJECT_NO_CONTEXT)
    if require_called_aet and called_aet.strip() != our_aet:
        return Decision(False, f"called AE title {called_aet.strip()!r} is not ours",
                        REJECT_CALLED_AET)
    if not allow_list:
        return Decision(True)
    known = [n for n in nodes.values() if n.aet == calling]
    if not known:
        return Decision(False, f"calling AE title {calling!r} is not a known node",
                        REJECT_CALLING_AET)
    if check_host and not any(host_matches(n.host, peer_host) for n in known):
        return Decision(False, f"calling AE title {calling!r} is known, but not from "
                        f"{peer_host}", REJECT_CALLING_AET)
    return Decision(True)

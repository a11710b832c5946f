"""docs/conformance.md says what the code does: its transfer syntax table is the gateway's list
(same UIDs, same order: the order decides which syntax a context is accepted with), and its
C-FIND key table is the index's matching keys per level."""

from __future__ import annotations

import re
from pathlib import Path

from services.gateway.server import TRANSFER_SYNTAXES
from shared.query import COLUMNS, LEVELS

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


def table(name: str) -> list[list[str]]:
    """The body rows of the table between ``<!-- conformance:<name> ...-->`` and the next
    ``<!-- conformance:end -->``, as lists of cell texts."""
    text = DOC.read_text()
    found = re.search(rf"<!-- conformance:{name}\b.*?-->\n(.*?)<!-- conformance:end -->",
                      text, re.DOTALL)
    assert found, f"no conformance:{name} table in {DOC.name}"
    rows = [line.strip().strip("|").split("|") for line in found.group(1).splitlines()
            if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # header and rule skipped


def test_transfer_syntax_table_is_the_gateways_list_in_its_order() -> None:
    rows = table("transfer-syntaxes")
    assert [uid for uid, _ in rows] == [str(ts) for ts in TRANSFER_SYNTAXES]
    assert [name for _, name in rows] == [ts.name for ts in TRANSFER_SYNTAXES]


def test_find_key_table_is_the_indexed_keys_per_level() -> None:
    documented = {level: [k.strip() for k in keys.split(",")]
                  for level, keys in table("find-keys")}
    assert documented == {level: [c.keyword for c in COLUMNS.values() if c.level == level]
                          for level in LEVELS}

"""Preference data formats: a ``Pair`` (conversation, chosen, rejected) and the HH-RLHF
transcript format (``\n\nHuman:`` / ``\n\nAssistant:`` turns), read from jsonl/parquet with
``datasets``. Rows that cannot be used are dropped, counted by reason, and the first of each
kind is reported with its file, row and field."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

Messages = list[dict[str, str]]


@dataclass
class Pair:
    messages: Messages  # the conversation before the final response
    chosen: str
    rejected: str


class MalformedRow(ValueError):
    """A preference row that cannot be used; ``reason`` is the count key."""

    def __init__(self, reason: str, where: str, field: str, detail: str = ""):
        self.reason = reason
        super().__init__(
            f"{where}: field '{field}': {reason.replace('_', ' ')}{': ' + detail if detail else ''}"
        )


_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def parse_hh(text: str, where: str = "", field: str = "chosen") -> tuple[Messages, str]:
    """Split an HH-RLHF transcript into (prompt messages, final Assistant response)."""
    if not isinstance(text, str):
        raise MalformedRow("not_text", where, field, f"got {type(text).__name__}")
    parts = _TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip():
        raise MalformedRow("text_before_first_turn", where, field, repr(parts[0][:40]))
    turns = [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]
    if not turns or turns[-1][0] != "Assistant":
        raise MalformedRow(
            "no_assistant_turn", where, field, "the transcript must end with an Assistant turn"
        )
    response = turns[-1][1].strip()
    if not response:
        raise MalformedRow("empty_response", where, field)
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[r], "content": c.strip()} for r, c in turns[:-1]]
    if not messages:
        raise MalformedRow("no_human_turn", where, field)
    return messages, response


def parse_hh_row(row: dict, where: str) -> Pair:
    for field in ("chosen", "rejected"):
        if field not in row or row[field] is None:
            raise MalformedRow("missing_field", where, field)
    prompt_c, chosen = parse_hh(row["chosen"], where, "chosen")
    prompt_r, rejected = parse_hh(row["rejected"], where, "rejected")
    if prompt_c != prompt_r:
        raise MalformedRow(
            "prompt_mismatch", where, "rejected", "chosen and rejected differ before the final turn"
        )
    if chosen == rejected:
        raise MalformedRow("identical_responses", where, "rejected")
    return Pair(prompt_c, chosen, rejected)


def load_hh(path: str) -> tuple[list[Pair], Counter, list[str]]:
    """Read an HH-format jsonl/json/parquet file with ``datasets``.

    Returns the usable pairs, dropped rows counted by reason, and one message per reason
    naming the file, row and field of its first occurrence.
    """
    import datasets

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"reward.data_path: no such file: {path}")
    kind = "parquet" if p.suffix == ".parquet" else "json"
    ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    pairs, dropped, examples = [], Counter(), {}
    for i, row in enumerate(ds):
        try:
            pairs.append(parse_hh_row(row, f"{path}: row {i}"))
        except MalformedRow as e:
            dropped[e.reason] += 1
            examples.setdefault(e.reason, str(e))
    return pairs, dropped, list(examples.values())

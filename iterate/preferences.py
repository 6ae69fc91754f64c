"""Preference data: a ``Pair`` (conversation, chosen response, rejected response) read from
the formats preference datasets use, in jsonl / json / parquet files or ``datasets``
folders saved with ``save_to_disk``, and mixtures of several such sources with weights.

Formats, told apart row by row:

- **HH-RLHF transcripts**: ``chosen`` / ``rejected`` strings of ``\\n\\nHuman:`` /
  ``\\n\\nAssistant:`` turns; the prompt is every turn before the last, the response is the
  final Assistant turn (both transcripts must agree before it).
- **Conversational**: ``chosen`` / ``rejected`` lists of ``{"role", "content"}`` messages
  (UltraFeedback-binarized style: the whole conversation, the last message the response),
  optionally with a ``prompt`` (text or messages) and then only the response in each list
  (TRL's conversational preference format).
- **Prompt and completions**: ``prompt``, ``chosen`` and ``rejected`` strings.

Rows that cannot be used are dropped and counted by reason, and the first of each reason is
reported with its file, row and field.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from iterate.errors import BadInput

Messages = list[dict[str, str]]


@dataclass
class Pair:
    messages: Messages  # the conversation before the final response
    chosen: str
    rejected: str
    where: str = ""  # file and row, for messages about this pair


class MalformedRow(ValueError):
    """A preference row that cannot be used; ``reason`` is the count key."""

    def __init__(self, reason: str, where: str, field: str, detail: str = ""):
        self.reason = reason
        text = reason.replace("_", " ") + (f": {detail}" if detail else "")
        super().__init__(f"{where}: field '{field}': {text}")


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
        detail = "the transcript must end with an Assistant turn"
        raise MalformedRow("no_assistant_turn", where, field, detail)
    response = turns[-1][1].strip()
    if not response:
        raise MalformedRow("empty_response", where, field)
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[r], "content": c.strip()} for r, c in turns[:-1]]
    if not messages:
        raise MalformedRow("no_human_turn", where, field)
    return messages, response


def _messages(value, where: str, field: str) -> Messages:
    """A list of ``{"role", "content"}`` messages, checked."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise MalformedRow("not_messages", where, field, f"got {type(value).__name__}")
    out = []
    for m in value:
        if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
            raise MalformedRow("not_messages", where, field, "a message lacks 'role' or 'content'")
        if not isinstance(m["content"], str):
            raise MalformedRow("not_messages", where, field, "a message's content is not text")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def _response(messages: Messages, where: str, field: str) -> str:
    if messages[-1]["role"] != "assistant":
        detail = "the last message must be the assistant's"
        raise MalformedRow("no_assistant_turn", where, field, detail)
    if not messages[-1]["content"].strip():
        raise MalformedRow("empty_response", where, field)
    return messages[-1]["content"].strip()


def parse_row(row: dict, where: str) -> Pair:
    """One preference row in any of the formats above, as a ``Pair``."""
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            raise MalformedRow("missing_field", where, field)
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str) and prompt is None:  # HH
        messages, c = parse_hh(chosen, where, "chosen")
        prompt_r, r = parse_hh(rejected, where, "rejected")
        if messages != prompt_r:
            detail = "chosen and rejected differ before the final turn"
            raise MalformedRow("prompt_mismatch", where, "rejected", detail)
    elif isinstance(chosen, str) and isinstance(rejected, str):  # prompt and completions
        messages = _messages(prompt, where, "prompt")
        c, r = chosen.strip(), rejected.strip()
        for field, text in (("chosen", c), ("rejected", r)):
            if not text:
                raise MalformedRow("empty_response", where, field)
    elif isinstance(chosen, list) and isinstance(rejected, list):  # conversational
        cm, rm = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
        c, r = _response(cm, where, "chosen"), _response(rm, where, "rejected")
        if prompt is not None:
            messages = _messages(prompt, where, "prompt")
            before = [m for m in (cm[:-1], rm[:-1]) if m and m != messages]
        else:
            messages, before = cm[:-1], ([rm[:-1]] if rm[:-1] != cm[:-1] else [])
        if before:
            detail = "chosen and rejected differ before the final turn"
            raise MalformedRow("prompt_mismatch", where, "rejected", detail)
        if not messages:
            raise MalformedRow("no_prompt", where, "chosen", "nothing before the response")
    else:
        kinds = f"chosen is {type(chosen).__name__}, rejected is {type(rejected).__name__}"
        raise MalformedRow("unknown_format", where, "chosen", kinds)
    if c == r:
        raise MalformedRow("identical_responses", where, "rejected")
    return Pair(messages, c, r, where)


def _json_rows(p: Path) -> list:
    """The rows of a .jsonl (one object per line) or .json (a list of objects) file, read
    here so that bad bytes or a broken line are reported with the file and line."""

    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise BadInput(f"{p}: line {line}: not UTF-8 (byte {e.start}: {e.reason})") from None
    if p.suffix == ".jsonl" or text.lstrip().startswith("{"):  # JSON lines
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadInput(
                    f"{p}: line {n}: not valid JSON ({e.msg}, column {e.colno})"
                ) from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(
                f"{p}: line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})"
            ) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BadInput(f"{p}: expected one JSON object per line, or a JSON list of objects")
    if not rows:
        raise BadInput(f"{p}: the file has no rows")
    return rows


def _mixed(p: Path, rows: list) -> str | None:
    """The first row whose field holds another type of value than the field's first (what
    a column cannot hold), as a message naming the file, row and field."""
    first: dict[str, tuple[int, str]] = {}
    for k, row in enumerate(rows):
        for name, value in row.items() if isinstance(row, dict) else ():
            if value is None:
                continue
            kind = type(value).__name__
            at, seen = first.setdefault(name, (k, kind))
            if seen != kind:
                return (
                    f"{p}: row {k}: field '{name}': {kind}, where row {at} has {seen} "
                    "(a field holds one type of value)"
                )
    return None


def read_rows(path: str, setting: str = ""):
    """The rows of a jsonl / json / parquet file or a ``save_to_disk`` folder (its train
    split). A file that is not what its name says (bad bytes, broken JSON, a ``.parquet``
    that is not Parquet, a folder that is no saved dataset, no rows) is bad input naming
    ``setting`` (the config key that gave the path), the file and where."""
    try:
        return _read_rows(Path(path))
    except BadInput as e:
        raise BadInput(f"{setting}={e}" if setting else str(e)) from None


def _read_rows(p: Path):
    import datasets

    if not p.exists():
        raise FileNotFoundError(f"preference data: no such file or folder: {p}")
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except FileNotFoundError:
            raise BadInput(
                f"{p}: a folder, but not a dataset saved by datasets' save_to_disk "
                "(give a .jsonl, .json or .parquet file, or such a folder)"
            ) from None
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    if p.suffix == ".parquet":
        try:
            ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
        except Exception as e:  # (pyarrow's ArrowInvalid, wrapped by datasets)
            cause = str(e.__cause__ or e).splitlines()[0][:200]
            raise BadInput(f"{p}: not a Parquet file ({cause})") from None
    else:
        rows = _json_rows(p)
        names = dict.fromkeys(k for r in rows for k in r)  # every row's fields, not the first's
        rows = [{k: r.get(k) for k in names} for r in rows]  # (a row without one: None)
        try:
            ds = datasets.Dataset.from_list(rows)
        except (ValueError, TypeError) as e:  # (pyarrow's ArrowInvalid, ArrowTypeError)
            raise BadInput(_mixed(p, rows) or f"{p}: {e}") from None
    if len(ds) == 0:
        raise BadInput(f"{p}: the file has no rows")
    return ds


def load(
    path: str, weight: float = 1.0, seed: int = 0, setting: str = ""
) -> tuple[list[Pair], dict, list[str]]:
    """The pairs of one source, what happened to its rows (``rows``, ``usable``, ``used``,
    ``dropped`` by reason), and one message per drop reason naming the file, row and field
    of its first occurrence. ``weight``: how many times each usable pair is used, whole
    repeats plus a seeded sample for the fraction (0.25: a quarter of them; 2: each twice)."""
    pairs, dropped, examples, rows = [], Counter(), {}, 0
    for i, row in enumerate(read_rows(path, setting)):
        rows += 1
        try:
            pairs.append(parse_row(row, f"{path}: row {i}"))
        except MalformedRow as e:
            dropped[e.reason] += 1
            examples.setdefault(e.reason, str(e))
    whole, part = int(weight), weight - int(weight)
    used = pairs * whole + random.Random(f"{seed}:{path}").sample(pairs, round(part * len(pairs)))
    stats = {"rows": rows, "usable": len(pairs), "used": len(used), "dropped": dict(dropped)}
    return used, stats, list(examples.values())


def load_mixture(
    sources: list, seed: int = 0, setting: str = "reward.data"
) -> tuple[list[Pair], dict, list[str]]:
    """Several sources (each with ``path`` and ``weight``), their pairs together; what
    happened to the rows, per source. ``setting``: the config key that lists them."""
    pairs, stats, examples = [], {}, []
    for k, src in enumerate(sources):
        got, stats[src.path], ex = load(src.path, src.weight, seed, f"{setting}[{k}].path")
        pairs += got
        examples += ex
    return pairs, stats, examples

"""Verifiable instructions in the manner of IFEval (Zhou et al. 2023): kinds of constraint a
response can be checked against without a model, each with the words that ask for it and a
checker, written here.

A constraint is ``{"kind": name, "args": {...}}``; a prompt carries its list in the prompt
row's ``constraints`` field (``prompts.fields=[constraints]``). ``instruction(c)`` is the
sentence that asks for it, ``holds(c, response)`` whether the response keeps it.

The reward functions (``reward.function`` or an ``evaluate.judges`` judge) read that field:

- ``reward``: the share of the prompt's constraints kept (IFEval's instruction level, per
  response), what the loop optimises;
- ``prompt_level``: 1 when every constraint is kept, else 0 (IFEval's prompt-level
  accuracy, the headline figure);
- ``instruction_level``: the same share as ``reward``, named for the evaluation.

A prompt without constraints (a row from elsewhere) scores ``None``: dropped and counted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

WORD = re.compile(r"\b\w+(?:'\w+)?\b")
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
BULLET = re.compile(r"^\s*[*-]\s+\S", re.MULTILINE)
PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\]")
HIGHLIGHT = re.compile(r"(?<!\*)\*[^\s*][^*\n]*\*(?!\*)")
TITLE = re.compile(r"<<[^<>\n]+>>")
FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


def words(text: str) -> int:
    return len(WORD.findall(text))


def sentences(text: str) -> int:
    """Sentences by their end marks; a last one without a mark counts too."""
    text = text.strip()
    if not text:
        return 0
    ends = SENTENCE_END.findall(text)
    return len(ends) + (0 if SENTENCE_END.search(text[-1:] + " ") else 1)


def _has(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def _json(text: str) -> bool:
    text = text.strip()
    fenced = FENCE.match(text)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return True


def _paragraphs(text: str) -> int:
    parts = re.split(r"^\s*\*\*\*\s*$", text, flags=re.MULTILINE)
    return len([p for p in parts if p.strip()]) if len(parts) > 1 else (1 if text.strip() else 0)


@dataclass(frozen=True)
class Kind:
    """A kind of constraint: the words that ask for it (``{name}`` fields filled from its
    args), its checker ``check(response, **args)``, and the groups it belongs to (two kinds
    of one group are never asked together: they would contradict or crowd each other)."""

    name: str
    text: str
    check: Callable[..., bool]
    groups: tuple[str, ...] = ()


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "max_words", "Answer in fewer than {n} words.", lambda r, n: words(r) < n, ("length",)
        ),
        Kind(
            "min_words", "Answer with at least {n} words.", lambda r, n: words(r) >= n, ("length",)
        ),
        Kind(
            "max_sentences",
            "Use at most {n} sentences.",
            lambda r, n: 0 < sentences(r) <= n,
            ("length",),
        ),
        Kind(
            "bullets",
            "Your answer must contain exactly {n} bullet points in markdown, "
            "such as:\n* This is a point.",
            lambda r, n: len(BULLET.findall(r)) == n,
            ("shape",),
        ),
        Kind(
            "lowercase",
            "Your entire response must be in lowercase letters; no capital letters are allowed.",
            lambda r: r == r.lower() and any(c.isalpha() for c in r),
            ("case",),
        ),
        Kind(
            "capitals",
            "Your entire response must be in capital letters only.",
            lambda r: r == r.upper() and any(c.isalpha() for c in r),
            ("case",),
        ),
        Kind("no_commas", "Do not use any commas in your response.", lambda r: "," not in r),
        Kind(
            "keywords",
            "Include the keywords {a} and {b} in your response.",
            lambda r, a, b: _has(a, r) and _has(b, r),
            ("words",),
        ),
        Kind(
            "forbidden",
            "Do not use the word {w} in your response.",
            lambda r, w: not _has(w, r),
            ("words",),
        ),
        Kind(
            "starts_with",
            "Begin your response with the exact words: {phrase}",
            lambda r, phrase: r.strip().lower().startswith(phrase.lower()),
            ("start",),
        ),
        Kind(
            "ends_with",
            "Finish your response with this exact phrase: {phrase} No other "
            "words should follow it.",
            lambda r, phrase: r.strip().lower().endswith(phrase.lower()),
            ("end",),
        ),
        Kind(
            "json",
            "Wrap your entire output in JSON format.",
            _json,
            ("shape", "start", "end", "case"),
        ),
        Kind(
            "title",
            "Your answer must contain a title, wrapped in double angular brackets, "
            "such as <<my title>>.",
            lambda r: TITLE.search(r) is not None,
            ("start",),
        ),
        Kind(
            "paragraphs",
            "There should be exactly {n} paragraphs, separated by the markdown divider: ***",
            lambda r, n: _paragraphs(r) == n,
            ("shape",),
        ),
        Kind(
            "quotation",
            "Wrap your entire response with double quotation marks.",
            lambda r: len(r.strip()) > 1 and r.strip()[0] == r.strip()[-1] == '"',
            ("start", "end", "shape"),
        ),
        Kind(
            "placeholders",
            "The response must contain at least {n} placeholders in square "
            "brackets, such as [address].",
            lambda r, n: len(PLACEHOLDER.findall(r)) >= n,
        ),
        Kind(
            "postscript",
            "At the end of your response, please add a postscript starting with P.S.",
            lambda r: re.search(r"^\s*P\.\s?S\.", r, re.MULTILINE) is not None,
            ("end",),
        ),
        Kind(
            "highlights",
            "Highlight at least {n} sections of your answer with markdown, for "
            "example *highlighted section*.",
            lambda r, n: len(HIGHLIGHT.findall(r)) >= n,
        ),
    )
}


def _args(c: dict) -> dict:
    """A constraint's arguments; those that are None are not its own (a table that reads
    rows of several kinds gives each row every kind's argument names)."""
    return {k: v for k, v in (c.get("args") or {}).items() if v is not None}


def instruction(c: dict) -> str:
    """The sentence that asks for constraint ``c``."""
    return KINDS[c["kind"]].text.format(**_args(c))


def holds(c: dict, response: str) -> bool:
    """Whether ``response`` keeps constraint ``c``."""
    return bool(KINDS[c["kind"]].check(response, **_args(c)))


def _constraints(value) -> list[dict] | None:
    if value is None:
        return None
    got = json.loads(value) if isinstance(value, str) else value
    return got or None


def kept(constraints: list, responses: list[str]) -> list[list[bool] | None]:
    """For each response, whether it keeps each of its prompt's constraints (None: the
    prompt has none)."""
    out = []
    for value, r in zip(constraints, responses, strict=True):
        cs = _constraints(value)
        out.append(None if cs is None else [holds(c, r) for c in cs])
    return out


def reward(prompts: list, responses: list[str], constraints: list) -> list[float | None]:
    """The share of the prompt's constraints the response keeps (instruction level)."""
    return [None if k is None else sum(k) / len(k) for k in kept(constraints, responses)]


def prompt_level(prompts: list, responses: list[str], constraints: list) -> list[float | None]:
    """1 when the response keeps every constraint of its prompt, else 0."""
    return [None if k is None else float(all(k)) for k in kept(constraints, responses)]


instruction_level = reward  # the same figure, under the name the evaluation reports

"""The configuration reference (``docs/settings.md``), made from the config classes
themselves: every setting by its key, with its type, its default and the comment written
beside it in ``iterate/config.py``, section by section. ``python -m iterate.report.settings``
prints it; a test holds the committed page equal to what this prints, so the page cannot
fall behind the code."""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import typing

from iterate import config

PAGE = "docs/settings.md"


def _comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the comment lines above the field and the one beside it."""
    source = inspect.getsource(config)
    lines = source.splitlines()
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            above, k = [], item.lineno - 2
            while k >= 0 and lines[k].strip().startswith("#"):
                above.insert(0, lines[k].strip()[1:].strip())
                k -= 1
            end = lines[item.end_lineno - 1]
            beside = end.split("  # ", 1)[1].strip() if "  # " in end else ""
            said = " ".join([*above, beside]).strip()
            out[(node.name, item.target.id)] = said
    return out


def _type(tp) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " \\| ".join(m.value for m in tp)
    name = getattr(tp, "__name__", None)
    if name and not typing.get_args(tp):
        return name
    return str(tp).replace("typing.", "").replace("iterate.config.", "").replace("|", "\\|")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(a section)"
    else:
        return "(required)"
    value = value.value if isinstance(value, enum.Enum) else value
    return "null" if value is None else f"`{value!r}`".replace("|", "\\|")


def _rows(cls, prefix: str, said: dict, sections: list) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            sections.append((key, tp))
            continue
        items = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if items:  # a list of sections: each item's settings under key[*]
            sections.append((f"{key}[*]", items[0]))
        note = said.get((cls.__name__, f.name), "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type(tp)} | {_default(f)} | {note} |")
    return rows


def page() -> str:
    said, out = (
        _comments(),
        [
            "# Settings",
            "",
            "Every setting, by its key, with its type, its default (before a config group's YAML",
            "sets its own) and what `iterate/config.py` says of it. Made by",
            "`python -m iterate.report.settings > docs/settings.md`; a test holds this page equal",
            "to the code.",
        ],
    )
    sections: list = []
    top = _rows(config.Config, "", said, sections)
    out += ["", "## Top level", "", "| key | type | default | |", "|---|---|---|---|", *top]
    while sections:
        key, cls = sections.pop(0)
        doc = " ".join((cls.__doc__ or "").split())
        doc = "" if doc.startswith(f"{cls.__name__}(") else doc  # (a dataclass's own signature)
        nested: list = []
        rows = _rows(cls, f"{key}.", said, nested)
        sections[:0] = nested
        out += ["", f"## {key}", ""] + ([doc, ""] if doc else [])
        out += ["| key | type | default | |", "|---|---|---|---|", *rows]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(page(), end="")

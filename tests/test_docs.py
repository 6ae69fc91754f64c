"""The README and docs/ link only to files and headings that exist (the README is a map
into docs/: a moved section must not leave its links behind)."""

from __future__ import annotations

import re

from .conftest import ROOT


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path) -> set[str]:
    out, fence = set(), False
    for line in path.read_text().splitlines():
        fence ^= line.startswith("```")
        if not fence and (m := re.match(r"^#{1,6} (.*)", line)):
            out.add(_slug(m.group(1)))
    return out


def broken(paths) -> list[str]:
    bad = []
    for p in paths:
        for m in re.finditer(r"\]\(([^)\s]+)\)", p.read_text()):
            link = m.group(1)
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = link.partition("#")
            target = (p.parent / file).resolve() if file else p.resolve()
            if not target.exists():
                bad.append(f"{p.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                bad.append(f"{p.name}: {link} (no such heading)")
    return bad


def test_every_link_of_the_readme_and_the_docs_leads_somewhere(tmp_path):
    assert not broken([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    page = tmp_path / "page.md"  # the check finds what it looks for
    page.write_text("# A b\n\n[x](#a-b) [y](#c) [z](nowhere.md)\n")
    assert broken([page]) == ["page.md: #c (no such heading)", "page.md: nowhere.md (no such file)"]


def test_the_settings_page_is_the_config_classes():
    """docs/settings.md is what ``python -m iterate.report.settings`` makes of the config
    classes: a setting added, renamed or documented anew shows there, or this fails."""
    from iterate.report import settings

    made = settings.page()
    assert (ROOT / settings.PAGE).read_text() == made, (
        "docs/settings.md is behind the code: python -m iterate.report.settings > docs/settings.md"
    )
    for key in ("`reward.kind`", "`handoff.reward_tolerance_se`", "`evaluate.judges[*].judge`"):
        assert key in made or key.replace("`", "") in made
    assert "| `handoff.kl_target` | float | `0.8` | " in made

"""The instruction-following world's prompts: a task about a topic, then one or two verifiable
constraints (``checks``), each prompt carrying its constraints as the row field
``constraints``.

Tasks x topics x constraints, drawn deterministically from a seed. The held-out prompts are
about topics no training prompt is about (every ``HELDOUT_EVERY``-th topic), so the
evaluation measures constraint following on new material, not recall. ``write`` makes the
three files that ``experiment=instruct`` reads (``data/instruct/``, committed; a test holds
them equal to what this module makes): ``python -m iterate.instruct.prompts``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from iterate.instruct.checks import KINDS, instruction

TASKS = (
    "Write a short poem about {topic}.",
    "Describe {topic} to a ten-year-old.",
    "Give three tips about {topic}.",
    "Write a short story about {topic}.",
    "Explain why {topic} matters.",
    "Write a product description for {topic}.",
    "Write a short blog post about {topic}.",
    "Write a letter to a friend about {topic}.",
    "List some facts about {topic}.",
    "Write a limerick about {topic}.",
    "Write a short speech about {topic}.",
    "Summarise what people like about {topic}.",
)
TOPICS = (
    "the ocean",
    "coffee",
    "a rainy day",
    "mountains",
    "friendship",
    "bicycles",
    "winter",
    "a small town",
    "the moon",
    "gardening",
    "trains",
    "libraries",
    "a lost key",
    "honey bees",
    "the desert",
    "a birthday party",
    "robots",
    "the river",
    "breakfast",
    "a new job",
    "volcanoes",
    "the city at night",
    "a lighthouse",
    "chess",
    "autumn leaves",
    "a museum",
    "clouds",
    "a road trip",
    "the forest",
    "music",
    "a snowstorm",
    "cooking pasta",
    "the stars",
    "a school day",
    "an old bridge",
    "running",
    "a market",
    "the wind",
    "a first day at sea",
    "owls",
    "a quiet morning",
    "the island",
    "tea",
    "a long walk",
    "painting",
    "a summer fair",
    "the harbour",
    "photography",
)
HELDOUT_EVERY = 6  # topics 0, 6, 12, ... are held out

KEYWORDS = (
    "light",
    "home",
    "bright",
    "friend",
    "green",
    "water",
    "quiet",
    "journey",
    "gold",
    "simple",
    "memory",
    "story",
)
FORBIDDEN = ("the", "and", "very", "is", "beautiful", "good")
STARTS = ("My answer is this:", "Here is my reply.", "Dear reader,", "Of course.")
ENDS = ("Is there anything else I can help with?", "That is all.", "Thank you for reading.")


def draw_args(kind: str, rng: random.Random) -> dict:
    """The parameters of a constraint of ``kind``."""
    if kind in ("max_words", "min_words"):
        return {"n": rng.choice((20, 30, 40, 50)) if kind == "max_words" else rng.choice((40, 60))}
    if kind in ("max_sentences", "bullets", "paragraphs", "placeholders", "highlights"):
        hi = {
            "max_sentences": 4,
            "bullets": 4,
            "paragraphs": 3,
            "placeholders": 2,
            "highlights": 2,
        }[kind]
        return {"n": rng.randint(2 if kind in ("bullets", "paragraphs") else 1, hi)}
    if kind == "keywords":
        a, b = rng.sample(KEYWORDS, 2)
        return {"a": a, "b": b}
    if kind == "forbidden":
        return {"w": rng.choice(FORBIDDEN)}
    if kind == "starts_with":
        return {"phrase": rng.choice(STARTS)}
    if kind == "ends_with":
        return {"phrase": rng.choice(ENDS)}
    return {}


def draw_constraints(rng: random.Random, most: int = 2) -> list[dict]:
    """One constraint, or (two times in five) two whose kinds share no group."""
    count = 1 if most == 1 or rng.random() < 0.6 else 2
    out: list[dict] = []
    while len(out) < count:
        kind = rng.choice(sorted(KINDS))
        taken = {g for c in out for g in KINDS[c["kind"]].groups} | {c["kind"] for c in out}
        if kind in taken or taken & set(KINDS[kind].groups):
            continue
        out.append({"kind": kind, "args": draw_args(kind, rng)})
    return out


def prompt(task: str, topic: str, constraints: list[dict]) -> str:
    return " ".join([task.format(topic=topic), *map(instruction, constraints)])


def make(name: str, heldout: bool, count: int, seed: int, taken: set[str] = frozenset()) -> list:
    """``count`` distinct prompts (rows with ``prompt``, ``constraints``, ``topic``, ``task``)
    about the held-out topics or the others, none of them in ``taken``; file ``name`` draws
    from a random stream of its own."""
    rng = random.Random(f"{seed}:{name}")
    topics = [t for k, t in enumerate(TOPICS) if (k % HELDOUT_EVERY == 0) == heldout]
    rows, seen = [], set(taken)
    while len(rows) < count:
        task, topic = rng.choice(TASKS), rng.choice(topics)
        cs = draw_constraints(rng)
        text = prompt(task, topic, cs)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"prompt": text, "constraints": cs, "topic": topic, "task": task})
    return rows


# file: (held-out topics, prompts). rm: the prompts a reward model learns from
# (reward=instruct_rm), about the training topics but none of train's prompts
FILES = {"train": (False, 2000), "heldout": (True, 200), "rm": (False, 400)}


def write(out: Path, seed: int = 0) -> dict[str, Path]:
    """The world's prompt files as JSON lines in ``out``: ``train.jsonl``, ``heldout.jsonl``,
    ``rm.jsonl``; no prompt is in two of them."""
    out.mkdir(parents=True, exist_ok=True)
    paths, taken = {}, set()
    for name, (held, count) in FILES.items():
        rows = make(name, held, count, seed, taken)
        taken |= {r["prompt"] for r in rows}
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iterate.instruct.prompts")
    parser.add_argument("--out", default="data/instruct")
    args = parser.parse_args(argv)
    for name, path in write(Path(args.out)).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

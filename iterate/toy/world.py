"""The toy world's instructions, responses of mixed quality, and the gold judge.

Five instruction families (arithmetic, greetings, short lists, counting, repeating a word).
A response has three independent attributes: correct or wrong, polite / neutral / rude,
concise / verbose / rambling. The SFT data mixes them, so a policy trained on it samples
responses of varied quality and best-of-n has something to choose from.

The gold judge (``gold_score``) is a deterministic function of (prompt, response). The loop
never sees it: it only trains the learned reward model's labels and measures win rates, so
the gap between proxy reward and gold reward shows over-optimisation.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from iterate.errors import BadInput

NAMES = [
    "Anna",
    "Ben",
    "Cara",
    "Dan",
    "Eva",
    "Finn",
    "Gina",
    "Hugo",
    "Ida",
    "Jon",
    "Kim",
    "Leo",
    "Mia",
    "Nils",
    "Olga",
    "Paul",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Uma",
    "Vik",
    "Wendy",
    "Xena",
    "Yara",
    "Zoe",
    "Alex",
    "Bella",
    "Carl",
    "Dora",
    "Emil",
    "Fay",
    "Gus",
    "Hana",
    "Ivan",
    "Jade",
]
CATEGORIES = {
    "colors": ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"],
    "fruits": ["apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry"],
    "animals": ["cat", "dog", "horse", "mouse", "lion", "tiger", "bear", "wolf"],
    "tools": ["hammer", "saw", "drill", "wrench", "knife", "rope", "shovel", "ladder"],
    "drinks": ["water", "tea", "coffee", "milk", "juice", "soda", "cocoa", "cider"],
    "cities": ["Paris", "Rome", "Berlin", "Madrid", "Oslo", "Vienna", "Prague", "Dublin"],
}
FAMILIES = ("arithmetic", "greeting", "list", "count", "repeat")
# A response has three independent attributes; the SFT data mixes them with these weights.
CORRECTNESS = {"correct": 0.6, "wrong": 0.4}
TONES = {"polite": 0.35, "neutral": 0.4, "rude": 0.25}
LENGTHS = {"concise": 0.5, "verbose": 0.3, "rambling": 0.2}

POLITE = ("sure", "happy to help", "nice to meet you", "glad")
RUDE = ("ugh", "obviously", "stop asking", "whatever", "boring")
FILLER = [
    "Let me think about this for a moment.",
    "That is a good question.",
    "I will do my best to answer it.",
    "I hope this helps and let me know if you have more questions.",
    "Thank you for asking me about this.",
]


@dataclass(frozen=True)
class Instruction:
    family: str
    prompt: str
    answer: str  # canonical content: "12", "Anna", "red, blue", "3, 4, 5"


def _instructions() -> list[Instruction]:
    out: list[Instruction] = []
    for a in range(7):
        for b in range(7):
            out.append(Instruction("arithmetic", f"What is {a} plus {b}?", str(a + b)))
            if a >= b:
                out.append(Instruction("arithmetic", f"What is {a} minus {b}?", str(a - b)))
    for name in NAMES:
        for verb in ("Say hello to", "Greet", "Say hi to"):
            out.append(Instruction("greeting", f"{verb} {name}.", name))
    for cat, items in CATEGORIES.items():
        for k in range(2, 6):
            for verb in ("Name", "List"):
                out.append(Instruction("list", f"{verb} {k} {cat}.", ", ".join(items[:k])))
    for a in range(0, 31):
        for length in range(3, 7):
            b = a + length - 1
            out.append(
                Instruction(
                    "count", f"Count from {a} to {b}.", ", ".join(map(str, range(a, b + 1)))
                )
            )
    words = [w for items in CATEGORIES.values() for w in items[:4]]
    for w in words:
        for k in range(2, 6):
            out.append(Instruction("repeat", f"Repeat {w} {k} times.", " ".join([w] * k)))
    return out


INSTRUCTIONS = _instructions()
_BY_PROMPT = {ins.prompt: ins for ins in INSTRUCTIONS}

# The families' grammar is wider than the instruction set above (larger numbers, longer
# lists and counts, every word of a category): a prompt writer can compose instructions
# nobody wrote, and the gold judge scores any prompt of the grammar.
_WORDS = {w: cat for cat, items in CATEGORIES.items() for w in items}
_GRAMMAR = {
    "arithmetic": re.compile(r"What is (\d{1,2}) (plus|minus) (\d{1,2})\?"),
    "greeting": re.compile(r"(?:Say hello to|Greet|Say hi to) ([A-Z][a-z]+)\."),
    "list": re.compile(r"(?:Name|List) ([2-6]) (" + "|".join(CATEGORIES) + r")\."),
    "count": re.compile(r"Count from (\d{1,2}) to (\d{1,2})\."),
    "repeat": re.compile(r"Repeat ([a-zA-Z]+) ([2-6]) times\."),
}


def parse(prompt: str) -> Instruction | None:
    """The instruction a prompt of the toy grammar asks for, or None."""
    prompt = prompt.strip()
    if prompt in _BY_PROMPT:
        return _BY_PROMPT[prompt]
    for family, pattern in _GRAMMAR.items():
        m = pattern.fullmatch(prompt)
        if not m:
            continue
        if family == "arithmetic":
            a, op, b = int(m[1]), m[2], int(m[3])
            if op == "minus" and a < b:
                return None
            return Instruction(family, prompt, str(a + b if op == "plus" else a - b))
        if family == "greeting":
            return Instruction(family, prompt, m[1]) if m[1] in NAMES else None
        if family == "list":
            return Instruction(family, prompt, ", ".join(CATEGORIES[m[2]][: int(m[1])]))
        if family == "count":
            a, b = int(m[1]), int(m[2])
            ok = 3 <= b - a + 1 <= 7
            return Instruction(family, prompt, ", ".join(map(str, range(a, b + 1)))) if ok else None
        if m[1] in _WORDS:
            return Instruction(family, prompt, " ".join([m[1]] * int(m[2])))
    return None


def _wider() -> list[Instruction]:
    """Instructions of the grammar beyond the written ones (larger sums, later counts, six
    items, the categories' other words), in a fixed order: the toy prompt pool's second tier,
    drawn after every written training prompt (so a long run has prompts to draw), never
    held out and never in the SFT data."""
    texts = [f"What is {a} plus {b}?" for a in range(13) for b in range(13)]
    texts += [f"What is {a} minus {b}?" for a in range(13) for b in range(a + 1)]
    texts += [f"Count from {a} to {a + n - 1}." for a in range(31, 56) for n in range(3, 7)]
    texts += [f"{verb} 6 {cat}." for cat in CATEGORIES for verb in ("Name", "List")]
    texts += [
        f"Repeat {w} {k} times."
        for items in CATEGORIES.values()
        for w in items[4:]
        for k in range(2, 6)
    ]
    return [parse(t) for t in texts if t not in _BY_PROMPT]


WIDER = _wider()


def random_instruction(family: str, rng: random.Random) -> Instruction:
    """An instruction of ``family`` drawn from the whole grammar."""
    if family == "arithmetic":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        text = (
            f"What is {max(a, b)} minus {min(a, b)}?"
            if rng.random() < 0.4
            else f"What is {a} plus {b}?"
        )
    elif family == "greeting":
        text = f"{rng.choice(['Say hello to', 'Greet', 'Say hi to'])} {rng.choice(NAMES)}."
    elif family == "list":
        text = f"{rng.choice(['Name', 'List'])} {rng.randint(2, 6)} {rng.choice(list(CATEGORIES))}."
    elif family == "count":
        a = rng.randint(0, 60)
        text = f"Count from {a} to {a + rng.randint(2, 6)}."
    else:
        text = f"Repeat {rng.choice(list(_WORDS))} {rng.randint(2, 6)} times."
    ins = parse(text)
    assert ins is not None, text
    return ins


def stable_hash(text: str) -> int:
    """A hash of text that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def is_heldout(prompt: str, fraction: float) -> bool:
    return stable_hash("heldout:" + prompt) % 10_000 < fraction * 10_000


def split(fraction: float) -> tuple[list[Instruction], list[Instruction]]:
    """Train and held-out instructions; the split depends only on the prompt text."""
    train = [i for i in INSTRUCTIONS if not is_heldout(i.prompt, fraction)]
    heldout = [i for i in INSTRUCTIONS if is_heldout(i.prompt, fraction)]
    return train, heldout


def _wrong(ins: Instruction, rng: random.Random) -> str:
    if ins.family == "arithmetic":
        return str(int(ins.answer) + rng.choice([-3, -2, -1, 1, 2, 3]))
    if ins.family == "greeting":
        return rng.choice([n for n in NAMES if n != ins.answer])
    items = ins.answer.split(", ")
    if ins.family == "list":
        return ", ".join(items[:-1]) if rng.random() < 0.5 else ", ".join(items + items[:1])
    if ins.family == "repeat":
        words = ins.answer.split()
        return " ".join(words[:-1] if rng.random() < 0.5 else [*words, words[0]])
    drop = rng.randrange(1, len(items))  # count: skip a number
    return ", ".join(items[:drop] + items[drop + 1 :])


def _core(ins: Instruction, answer: str) -> str:
    if ins.family == "arithmetic":
        expr = ins.prompt[len("What is ") : -1]
        return f"{expr} is {answer}."
    if ins.family == "greeting":
        return f"Hello {answer}!"
    return f"{answer}."


def respond(ins: Instruction, correct: bool, tone: str, length: str, rng: random.Random) -> str:
    """A response to ``ins`` with the given attributes."""
    core = _core(ins, ins.answer if correct else _wrong(ins, rng))
    parts = []
    if tone == "polite":
        parts.append(rng.choice(["Sure!", "Happy to help!", "Glad you asked!"]))
    elif tone == "rude":
        parts.append(rng.choice(["Ugh,", "Obviously", "Whatever,"]))
    if length == "verbose":
        parts += rng.sample(FILLER[:3], 2)
    elif length == "rambling":
        parts += [rng.choice(FILLER) for _ in range(rng.randint(3, 5))]
    parts.append(core)
    if length != "concise":
        parts.append(
            FILLER[3] if length == "verbose" else " ".join(rng.choice(FILLER) for _ in range(3))
        )
    if tone == "rude":
        parts.append(rng.choice(["Stop asking.", "Boring."]))
    return " ".join(parts)


def best_response(ins: Instruction) -> str:
    return respond(ins, True, "polite", "concise", random.Random(0))


REFERENCE = "toy-reference (right, neutral, of every length)"


def reference_outputs(fraction: float = 0.2) -> list[dict]:
    """The held-out prompts with a reference system's outputs, in AlpacaEval's format
    (``instruction``, ``output``, ``generator``, ``dataset``): right answers in a neutral
    tone, their length drawn as the SFT data's (concise, verbose or rambling), seeded. What
    ``data/toy_alpaca_eval.json`` holds (``evaluate.reference.path``, and
    ``prompts.heldout_path`` with ``prompts.heldout_field=instruction``)."""
    rng = random.Random(0)
    pick = lambda: rng.choices(list(LENGTHS), weights=list(LENGTHS.values()))[0]  # noqa: E731
    return [
        {
            "instruction": i.prompt,
            "output": respond(i, True, "neutral", pick(), rng),
            "generator": REFERENCE,
            "dataset": f"toy_{i.family}",
        }
        for i in split(fraction)[1]
    ]


def sample_response(ins: Instruction, rng: random.Random) -> tuple[str, str]:
    """A response with attributes drawn from the SFT mixture; returns (style, text)."""
    pick = lambda d: rng.choices(list(d), weights=list(d.values()))[0]  # noqa: E731
    correct, tone, length = pick(CORRECTNESS), pick(TONES), pick(LENGTHS)
    return f"{correct}/{tone}/{length}", respond(ins, correct == "correct", tone, length, rng)


_NUM = re.compile(r"-?\d+")


def _correct(ins: Instruction, response: str) -> bool:
    text = response.strip()
    if ins.family == "arithmetic":
        # the number after the question's own expression must be the answer
        expr = ins.prompt[len("What is ") : -1]
        rest = text.split(expr, 1)[1] if expr in text else text
        nums = _NUM.findall(rest)
        return bool(nums) and nums[0] == ins.answer and len(set(nums)) == 1
    if ins.family == "greeting":
        greeted = re.findall(r"\b(?:Hello|Hi|Hey)\s+([A-Z][a-z]+)", text)
        return greeted == [ins.answer]
    if ins.family == "list":
        items = ins.answer.split(", ")
        cat = next(c for c, v in CATEGORIES.items() if items[0] in v)
        said = [w for w in re.findall(r"[A-Za-z]+", text) if w in CATEGORIES[cat]]
        return len(said) == len(items) and len(set(said)) == len(said)
    if ins.family == "repeat":
        word = ins.answer.split()[0]
        return re.findall(r"[A-Za-z]+", text.replace("Sure", "")).count(word) == len(
            ins.answer.split()
        )
    nums = _NUM.findall(text)
    return nums == ins.answer.split(", ")


def gold_score(prompt: str, response: str) -> float:
    """The gold judge: correct (+1), polite (+0.25), rude (-0.5), concise (-0.02 a word over).

    Deterministic and defined on the toy world's grammar only (ValueError otherwise).
    """
    ins = parse(prompt)
    if ins is None:
        raise BadInput(f"gold_score: not a toy-world prompt: {prompt!r}")
    low = response.lower()
    score = 1.0 if _correct(ins, response) else 0.0
    score += 0.25 if any(p in low for p in POLITE) else 0.0
    score -= 0.5 if any(r in low for r in RUDE) else 0.0
    ideal = len(best_response(ins).split())
    score -= 0.02 * max(0, len(response.split()) - ideal)
    return round(score, 4)


def corpus(rng: random.Random) -> list[str]:
    """Text covering every prompt and every kind of response, for training the tokenizer."""
    out = []
    for ins in INSTRUCTIONS:
        out.append(ins.prompt)
        for correct in (True, False):
            for tone in TONES:
                for length in LENGTHS:
                    out.append(respond(ins, correct, tone, length, rng))
    return out


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold judge as a reward function (``reward=gold``: the oracle run, which
    optimises the judge it is measured by)."""
    return [gold_score(p, r) for p, r in zip(prompts, responses, strict=True)]


def correctness_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A verifiable reward (``reward=correct``): 1 if the answer is right, else 0; no credit
    for tone or length, the kind of reward group rules are used with."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        ins = parse(p)
        if ins is None:
            raise BadInput(f"correctness_reward: not a toy-world prompt: {p!r}")
        out.append(1.0 if _correct(ins, r) else 0.0)
    return out

"""A generative judge (``reward.kind: judge``): a causal LM shown a prompt and responses in a
template, in its own chat template, sampled through the run's sampler (``samplers.opened``,
under its own name: its engines never load a policy), its answer parsed by a regular
expression.

- ``compare``: two responses (``{a}``, ``{b}``), the answer "A", "B" or "C" (a tie), asked in
  both orders and averaged, so neither position is favoured; as a reward, a tournament over
  the responses to each prompt (``pairwise.tournament``), and the held-out evaluation asks
  it directly (``prefer``).
- ``score``: one response (``{response}``), the answer a number from ``low`` to ``high``.

An answer the pattern does not find (or a score out of range) is sampled again, up to
``retries`` times (greedy judges at temperature 1: greedy would repeat itself), then left
unjudged: a response with no judgement gets NaN, which the label stage drops and counts.
Every answer, parsed or not, is a record (``Judgement``) the label stage keeps in its
``judgements/`` shards, so a user can read what the judge said.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from iterate.errors import BadInput

TEMPLATES = {
    "compare": Path(__file__).parents[1] / "templates" / "pairwise.txt",
    "score": Path(__file__).parents[1] / "templates" / "judge_score.txt",
}
FIELDS = {"compare": ("{context}", "{a}", "{b}"), "score": ("{context}", "{response}")}
# the first match's first group: a verdict, or a number
PATTERNS = {"compare": r"(?<![A-Za-z])([ABC])(?![a-z])", "score": r"(-?\d+(?:\.\d+)?)"}
VERDICTS = {"A": 1.0, "B": 0.0, "C": 0.5}  # how much the response shown first won


def template(mode: str, spec: str | None) -> str:
    """What the judge is shown: the mode's shipped template (None), a file, or the text."""
    from iterate.rewards.pairwise_model import read_template

    says = f" (mode={mode} shows {', '.join(FIELDS[mode])})"
    return read_template(spec, TEMPLATES[mode], FIELDS[mode], "reward.judge.template", says)


def pattern(mode: str, spec: str | None) -> re.Pattern:
    """The parser: ``spec`` (None: the mode's default), a regular expression with a group."""
    try:
        rx = re.compile(spec or PATTERNS[mode])
    except re.error as e:
        raise BadInput(f"reward.judge.pattern={spec!r}: not a regular expression: {e}") from None
    if rx.groups < 1:
        raise BadInput(
            f"reward.judge.pattern={spec!r}: needs a group, (...), around the verdict or the score"
        )
    return rx


def parse(text: str, mode: str, rx: re.Pattern, low: float, high: float) -> float | None:
    """The verdict of an answer (compare: how much the response shown first won: A 1, B 0,
    C 0.5) or its score; None when the pattern finds none, or a score is out of range."""
    found = rx.search(text)
    if found is None or found.group(1) is None:
        return None
    said = found.group(1).strip()
    if mode == "compare":
        return VERDICTS.get(said.upper())
    try:
        value = float(said)
    except ValueError:
        return None
    return value if math.isfinite(value) and low <= value <= high else None


@dataclass
class Judgement:
    """One answer of the judge: the rows shown (``second`` -1 in score mode), which attempt
    it was (0: the first), what it said, and what that parsed to (None: nothing)."""

    first: int
    second: int
    attempt: int
    text: str
    verdict: float | None


@dataclass
class Judge:
    """A generative judge at ``path``, asked through the sampler ``how``
    (``samplers.How``)."""

    path: str
    how: Any  # samplers.How: the run's backend and engine settings, the judge's model's
    mode: str = "compare"
    text: str = ""  # the template (``template``)
    rx: Any = None  # the parser (``pattern``)
    max_tokens: int = 8
    temperature: float = 0.0
    retries: int = 2
    low: float = 1.0
    high: float = 10.0
    max_length: int = 1024  # the prompt and the answer
    chat_template: str | None = None
    _tok: Any = field(default=None, repr=False)

    def tokenizer(self):
        if self._tok is None:
            from iterate.train.models import load_tokenizer

            self._tok = load_tokenizer(self.path, self.chat_template)
        return self._tok

    def ask(
        self,
        prompts: list,
        shown: list[dict[str, str]],
        rows: list[tuple[int, int]],
        desc: str = "judge",
    ) -> tuple[list[float | None], list[Judgement]]:
        """The judge's verdict on each request (``prompts[k]`` with the responses
        ``shown[k]``, the rows ``rows[k]`` for the records), and every answer it gave."""
        from iterate import progress, workers
        from iterate.rewards.pairwise_model import encode
        from iterate.sampling import samplers
        from iterate.store import seeds
        from iterate.train.models import as_messages

        tok, room = self.tokenizer(), self.max_length - self.max_tokens
        seqs = [
            encode(tok, self.text, as_messages(p) if isinstance(p, str) else p, room, **s)
            for p, s in zip(prompts, shown, strict=True)
        ]
        verdicts: list[float | None] = [None] * len(seqs)
        records: list[Judgement] = []
        todo = list(range(len(seqs)))
        bar = progress.bar(len(seqs), desc, "answer")
        with samplers.opened(self.how, "judge") as sampler:
            sampler.load(self.path)
            for attempt in range(self.retries + 1):
                if not todo:
                    break
                hot = self.temperature if attempt == 0 or self.temperature > 0 else 1.0
                params = samplers.Params(n=1, temperature=hot, max_tokens=self.max_tokens)
                seed = seeds.derive("judge", attempt)
                chunks = [todo[w :: sampler.workers] for w in range(sampler.workers)]
                sampler.ready()
                got = workers.run_each(
                    [
                        partial(sampler.sample, [seqs[k] for k in chunk], params, seed, w)
                        for w, chunk in enumerate(chunks)
                        if chunk
                    ]
                )
                for chunk, samples in zip([c for c in chunks if c], got, strict=True):
                    for k, per_request in zip(chunk, samples, strict=True):
                        said = tok.decode(per_request[0].ids, skip_special_tokens=True)
                        verdicts[k] = parse(said, self.mode, self.rx, self.low, self.high)
                        records.append(Judgement(*rows[k], attempt, said, verdicts[k]))
                        bar.update(1 if attempt == 0 else 0)
                todo = [k for k in todo if verdicts[k] is None]
        bar.close()
        return verdicts, records

    def prefer(
        self,
        prompts: list,
        a: list[str],
        b: list[str],
        desc: str = "prefer",
        rows: list[tuple[int, int]] | None = None,
    ) -> tuple[list[float], list]:
        """P(a ≻ b) per row from the verdicts of both orders (the mean of those given; NaN
        when neither was), and the answers."""
        n = len(a)
        rows = rows or [(k, k) for k in range(n)]
        shown = [{"a": x, "b": y} for x, y in zip(a, b)] + [{"a": y, "b": x} for x, y in zip(a, b)]
        verdicts, records = self.ask(
            prompts + prompts, shown, rows + [(j, i) for i, j in rows], desc
        )
        out = []
        for k in range(n):
            said = [
                v
                for v in (verdicts[k], None if verdicts[n + k] is None else 1 - verdicts[n + k])
                if v is not None
            ]
            out.append(sum(said) / len(said) if said else float("nan"))
        return out, records

    def score(self, prompts: list, responses: list[str], desc: str = "judge"):
        """One reward per response (NaN: unjudged), and the answers."""
        if self.mode == "score":
            rows = [(k, -1) for k in range(len(responses))]
            verdicts, records = self.ask(prompts, [{"response": r} for r in responses], rows, desc)
            return [float("nan") if v is None else v for v in verdicts], records
        from iterate.rewards.pairwise_model import tournament

        records: list[Judgement] = []

        def prefer(pairs: list[tuple[int, int]]) -> list[float]:
            got, said = self.prefer(
                [prompts[i] for i, _ in pairs],
                [responses[i] for i, _ in pairs],
                [responses[j] for _, j in pairs],
                desc,
                pairs,
            )
            records.extend(said)
            return got

        return tournament(prompts, prefer), records

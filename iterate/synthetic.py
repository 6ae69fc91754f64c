"""Synthetic prompts (``prompts=self_instruct``): a generator writes new prompts from a few
seed examples, through the run's sampler; the candidates are filtered and the survivors are
the iteration's prompts.

The generator is the iteration's policy by default, a named model (a folder or hub id), or
in the toy world its prompt writer (``toy_writer``, ``iterate.toy.writer``). Each request
shows ``examples`` seed prompts and asks for ``candidates`` new ones. A candidate is dropped,
counted by reason, when it is empty, too short or too long, not a single plain prompt
(several lines, a refusal, an echo of the request), outside the toy world's grammar (toy
world only: the gold judge must be able to score it), or a duplicate or near-duplicate
(word 3-gram Jaccard overlap above ``max_overlap``) of any prompt the run knows: the seed
pool, the held-out set, earlier iterations' prompts and the candidates kept before it.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict

from iterate import models, sampling, seeds
from iterate.config import Config, plain
from iterate.errors import BadInput

REQUEST = "Write a new instruction like these:\n{examples}"
_REFUSAL = re.compile(r"\b(i can ?not|i can't|i'm sorry|i am sorry|as an ai|i am unable)\b")


def request(examples: list[str]) -> str:
    """The message that asks for a new prompt like ``examples``."""
    return REQUEST.format(examples="\n".join(examples))


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def trigrams(text: str) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    return {tuple(words[j : j + 3]) for j in range(max(1, len(words) - 2))}


class Known:
    """The prompts a candidate must not repeat: exact (normalised) and near (3-gram
    Jaccard) duplicates, found through an inverted index of 3-grams."""

    def __init__(self, texts: list[str] = ()):
        self.exact: set[str] = set()
        self.grams: list[set] = []
        self.index: dict[tuple, list[int]] = defaultdict(list)
        for t in texts:
            self.add(t)

    def add(self, text: str) -> None:
        self.exact.add(normalise(text))
        grams = trigrams(text)
        for g in grams:
            self.index[g].append(len(self.grams))
        self.grams.append(grams)

    def overlap(self, text: str) -> float:
        grams = trigrams(text)
        near = {k for g in grams for k in self.index.get(g, ())}
        return max(
            (len(grams & self.grams[k]) / len(grams | self.grams[k]) for k in near), default=0.0
        )


def check(text: str, known: Known, cfg: Config) -> str | None:
    """Why a candidate is dropped, or None to keep it."""
    sc = cfg.prompts.synthetic
    words = text.split()
    if not words:
        return "empty"
    if len(words) < sc.min_words:
        return "too_short"
    if len(words) > sc.max_words:
        return "too_long"
    if (
        "\n" in text
        or _REFUSAL.search(text.lower())
        or normalise(REQUEST.format(examples="")) in normalise(text)
    ):
        return "format"
    if str(cfg.prompts.source) == "toy":
        from iterate.toy import world

        if world.parse(text) is None:
            return "not_in_world"
    if normalise(text) in known.exact:
        return "duplicate"
    if known.overlap(text) > sc.max_overlap:
        return "near_duplicate"
    return None


def generator(cfg: Config, policy: str) -> tuple[str, str | None]:
    """(model, chat template override) of the configured generator."""
    name = cfg.prompts.synthetic.generator
    if not name:
        return policy, cfg.model.chat_template
    if name == "toy_writer":
        from iterate.toy import writer

        return str(writer.ensure(cfg.toy)), None
    return name, None


def write(
    cfg: Config, i: int, policy: str, seed_prompts: list[str], known: Known
) -> tuple[list[str], dict]:
    """``prompts.per_iteration`` new prompts for iteration ``i`` and what happened to the
    candidates: (prompts, info for ``_DONE.json``)."""
    sc, k = cfg.prompts.synthetic, cfg.prompts.per_iteration
    model, template = generator(cfg, policy)
    tok = models.load_tokenizer(model, template)
    params = sampling.Params(
        n=sc.candidates, temperature=sc.temperature, top_p=sc.top_p, max_tokens=sc.max_tokens
    )
    rng = random.Random(seeds.derive("self_instruct", cfg.seed, i))
    kept, dropped, candidates, rounds, spare = [], Counter(), 0, 0, 0
    with sampling.session(cfg) as sampler:
        sampler.load(model)
        while len(kept) < k and rounds < sc.max_rounds:
            # enough requests for what is missing at the share of candidates kept so far
            rate = max(len(kept) / candidates if candidates else 0.5, 0.02)
            n_req = min(256, math.ceil((k - len(kept)) / (sc.candidates * rate)))
            shown = [
                rng.sample(seed_prompts, min(sc.examples, len(seed_prompts))) for _ in range(n_req)
            ]
            asks = [models.prompt_ids(tok, request(ex)) for ex in shown]
            outs = sampler.sample(asks, params, seeds.derive("self_instruct", cfg.seed, i, rounds))
            rounds += 1
            for sample in (s for per_request in outs for s in per_request):
                candidates += 1
                text = sample.text.strip()
                reason = check(text, known, cfg)
                if reason:
                    dropped[reason] += 1
                elif len(kept) < k:
                    kept.append(text)
                    known.add(text)
                else:
                    spare += 1  # passed, but the iteration had its prompts already
    info = {"generator": model, "candidates": candidates, "rounds": rounds, "kept": len(kept),
            "spare": spare, "dropped": dict(dropped), "settings": plain(sc)}  # fmt: skip
    if len(kept) < k:
        raise BadInput(
            f"prompts (self_instruct): iteration {i} needs {k} prompts but {len(kept)} of "
            f"{candidates} candidates survived {rounds} rounds (dropped: {dict(dropped)}); "
            f"raise prompts.synthetic.max_rounds, loosen its filters, or lower per_iteration"
        )
    return kept, info

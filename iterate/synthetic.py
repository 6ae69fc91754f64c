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
from collections.abc import Callable
from pathlib import Path

from iterate.config import Config, plain
from iterate.errors import BadInput
from iterate.sampling import samplers
from iterate.store import seeds
from iterate.store.shards import atomic_write_json, read_json
from iterate.train import models

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
    Jaccard) duplicates, found through an inverted index of 3-grams.

    A near-duplicate check looks only at known prompts that share one of the candidate's
    rarest grams (prefix filtering): a prompt whose overlap with a candidate of ``a`` grams
    is above ``t`` shares more than ``t * a`` of them, so it holds at least one of the
    ``a - floor(t * a)`` rarest. Grams most prompts share ("what is the") are then never
    scanned, and the answer is exact."""

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

    def overlap(self, text: str, above: float = 0.0) -> float:
        """The largest 3-gram Jaccard overlap of ``text`` with a known prompt; exact where it
        is above ``above`` (below it, known prompts that share too few grams to pass it are
        not looked at, and a smaller value may be given)."""
        grams = trigrams(text)
        rare = sorted(grams, key=lambda g: (len(self.index.get(g, ())), g))
        prefix = rare[: len(grams) - math.floor(above * len(grams))]
        near = {k for g in prefix for k in self.index.get(g, ())}
        return max(
            (len(grams & self.grams[k]) / len(grams | self.grams[k]) for k in near), default=0.0
        )


def check(
    text: str, known: Known, cfg: Config, in_world: Callable[[str], bool] | None = None
) -> str | None:
    """Why a candidate is dropped, or None to keep it. ``in_world``: whether the prompt
    source's world can answer a text (the toy world's grammar), where it has one."""
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
    if in_world is not None and not in_world(text):
        return "not_in_world"
    if normalise(text) in known.exact:
        return "duplicate"
    if known.overlap(text, sc.max_overlap) > sc.max_overlap:
        return "near_duplicate"
    return None


def write(
    cfg: Config,
    i: int,
    writer: tuple[str, str | None],
    seed_prompts: list[str],
    known: Known,
    passed: Path,
    in_world: Callable[[str], bool] | None = None,
) -> tuple[list[str], dict]:
    """``prompts.per_iteration`` new prompts for iteration ``i`` from the model ``writer``
    (its path, and a chat template to use instead of its own, or None) and what happened to
    the candidates: (prompts, info for ``_DONE.json``). Each round's outcome is kept as it
    passes (``passed/round_NNNNN.json``: the prompts kept, the candidates, the drops), so a
    shortfall or a kill loses none of them: a rerun replays those rounds and asks only for
    what is missing, its rounds seeded by their number as the first run's were. ``in_world``:
    as in ``check``."""
    sc, k = cfg.prompts.synthetic, cfg.prompts.per_iteration
    kept, dropped, candidates, spare = [], Counter(), 0, 0
    keep_rates: list[float] = []  # per round: the share of its candidates that passed
    for done in sorted(Path(passed).glob("round_*.json")):  # what an earlier start kept
        r = read_json(done)
        for text in r["kept"]:
            kept.append(text)
            known.add(text)
        candidates, spare = candidates + r["candidates"], spare + r["spare"]
        dropped.update(r["dropped"])
        keep_rates.append(r["keep_rate"])
    rounds, (model, template) = len(keep_rates), writer
    if len(kept) < k and rounds < sc.max_rounds:
        tok = models.load_tokenizer(model, template)
        params = samplers.Params(
            n=sc.candidates, temperature=sc.temperature, top_p=sc.top_p, max_tokens=sc.max_tokens
        )
        cap = max(256, 2 * math.ceil(k / sc.candidates))  # requests per round: grows with k
        with samplers.session(cfg) as sampler:
            sampler.load(model)
            while len(kept) < k and rounds < sc.max_rounds:
                # enough requests for what is missing at the share of candidates kept so far
                rate = max(len(kept) / candidates if candidates else 0.5, 0.02)
                n_req = min(cap, math.ceil((k - len(kept)) / (sc.candidates * rate)))
                rng = random.Random(seeds.derive("self_instruct_examples", cfg.seed, i, rounds))
                shown = [
                    rng.sample(seed_prompts, min(sc.examples, len(seed_prompts)))
                    for _ in range(n_req)
                ]
                asks = [models.prompt_ids(tok, request(ex)) for ex in shown]
                seed = seeds.derive("self_instruct", cfg.seed, i, rounds)
                outs = [
                    s for per_request in sampler.sample(asks, params, seed) for s in per_request
                ]
                r = {"kept": [], "candidates": len(outs), "spare": 0, "dropped": Counter()}
                for sample in outs:
                    text = sample.text.strip()
                    reason = check(text, known, cfg, in_world)
                    if reason:
                        r["dropped"][reason] += 1
                    elif len(kept) < k:
                        kept.append(text)
                        known.add(text)
                        r["kept"].append(text)
                    else:
                        r["spare"] += 1  # passed, but the iteration had its prompts already
                r["keep_rate"] = round((len(r["kept"]) + r["spare"]) / max(1, len(outs)), 4)
                atomic_write_json(Path(passed) / f"round_{rounds:05d}.json", r)
                candidates, spare = candidates + r["candidates"], spare + r["spare"]
                dropped.update(r["dropped"])
                keep_rates.append(r["keep_rate"])
                rounds += 1
    info = {
        "generator": model,
        "candidates": candidates,
        "rounds": rounds,
        "kept": len(kept),
        "spare": spare,
        "dropped": dict(dropped),
        "keep_rates": keep_rates,
        "settings": plain(sc),
    }
    if len(kept) < k:
        raise BadInput(shortfall(i, k, len(kept), candidates, dict(dropped), keep_rates))
    return kept, info


def shortfall(
    i: int, k: int, kept: int, candidates: int, dropped: dict, keep_rates: list[float]
) -> str:
    """What a self-instruct shortfall says: a generator whose keep rate fell to near nothing
    has run out of new prompts (more rounds would not help); else more rounds, looser
    filters or fewer prompts."""
    rates = ", ".join(f"{r:.3f}" for r in keep_rates)
    said = (
        f"prompts (self_instruct): iteration {i} needs {k} prompts but {kept} of "
        f"{candidates} candidates survived {len(keep_rates)} rounds (dropped: {dropped}; "
        f"share kept per round: {rates})"
    )
    if len(keep_rates) >= 3 and max(keep_rates[-2:]) < 0.1 * max(keep_rates[0], 1e-9):
        return (
            f"{said}. The generator has run out of new prompts: the share it keeps fell "
            "to a tenth of its first round's, so more rounds would not help; loosen the "
            "filters (prompts.synthetic.max_overlap), give it more seed prompts, use "
            "another generator, or lower prompts.per_iteration"
        )
    return (
        f"{said}; raise prompts.synthetic.max_rounds, loosen its filters, or lower "
        "prompts.per_iteration"
    )

"""A pairwise preference model: a causal LM shown a prompt and two responses that answers
"A" or "B" (RLHFlow's pair-preference recipe). ``PairwiseScorer.prefer`` reads the
probability of "A" against "B" at the answer's position for both orders of the two
responses and averages them, so neither position is favoured; ``score`` turns preferences
into one reward per response by a tournament: each response's share of wins (expected,
from the probabilities) against the other responses to the same prompt in the call.

The comparison is the user turn of a conversation in the model's own chat template
(``iterate/templates/pairwise.txt``, or ``reward.pairwise_template``: a file or text with
``{context}``, ``{a}`` and ``{b}``), followed by the generation prompt; the answer tokens
are "A" and "B", single tokens in the tokenizer's vocabulary. ``pair_loss`` trains one
(``stages.reward_model``) as next-token A/B classification on both orders of each pair.
"""

from __future__ import annotations

from pathlib import Path

import torch

from iterate import progress
from iterate.errors import BadInput
from iterate.preferences import Messages
from iterate.train.models import as_messages, forward, pad

TEMPLATE = Path(__file__).parents[1] / "templates" / "pairwise.txt"
ANSWERS = ("A", "B")


def template(spec: str | None) -> str:
    """The comparison template: the shipped one (None), a file, or the text itself."""
    return read_template(spec, TEMPLATE, ("{context}", "{a}", "{b}"), "reward.pairwise_template")


def read_template(spec: str | None, shipped: Path, fields, key: str, says: str = "") -> str:
    """A template a model is shown: ``shipped`` (``spec`` None), a ``.txt`` / ``.jinja``
    file, or the text itself; ``BadInput`` naming ``key`` and the first of ``fields`` it
    lacks (``says``: what more to tell)."""
    if spec is None:
        return shipped.read_text().rstrip("\n")
    path = Path(spec)
    text = path.read_text() if path.suffix in (".txt", ".jinja") and path.is_file() else spec
    for field in fields:
        if field not in text:
            raise BadInput(f"{key}: no {field} in {spec!r}{says}")
    return text


def context(messages: Messages) -> str:
    """The prompt as the template shows it: its text, or a conversation's turns."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def answer_ids(tokenizer) -> list[int]:
    """The token ids of "A" and "B"; ``BadInput`` when either is not a single token."""
    ids = [tokenizer.encode(a, add_special_tokens=False) for a in ANSWERS]
    if any(len(i) != 1 for i in ids):
        raise BadInput(
            f"a pairwise model's tokenizer must spell 'A' and 'B' as one token each (got {ids})"
        )
    return [i[0] for i in ids]


def encode(tokenizer, text: str, messages: Messages, max_length: int, **shown: str) -> list[int]:
    """Token ids of ``text`` filled with the prompt (``{context}``) and the responses shown
    (``a=``, ``b=`` for a comparison, ``response=`` for a judge's score), up to where the
    answer goes. When it is longer than ``max_length``, the context is cut from its start,
    then each response from its end, to an equal share: both orders of a pair are cut
    alike."""

    def ids(ctx: str, **fields: str) -> list[int]:
        user = text.format(context=ctx, **fields)
        chat = [{"role": "user", "content": user}]
        if tokenizer.chat_template:
            out = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        else:
            out = f"\n\nHuman: {user}\n\nAssistant:"
        bos = tokenizer.bos_token
        return tokenizer(out, add_special_tokens=not (bos and out.startswith(bos)))["input_ids"]

    def cut(s: str, keep: int, end: bool) -> str:
        toks = tokenizer.encode(s, add_special_tokens=False)
        toks = toks[-keep:] if end and keep > 0 else toks[:keep] if keep > 0 else []
        return tokenizer.decode(toks)

    ctx = context(messages)
    out = ids(ctx, **shown)
    if len(out) <= max_length:
        return out
    fixed = len(ids("", **{k: "" for k in shown}))  # the template and the chat format
    lens = {k: len(tokenizer.encode(s, add_special_tokens=False)) for k, s in shown.items()}
    room = max_length - fixed - sum(lens.values())
    # (a few tokens spare: text cut and joined again may tokenize a little longer; at worst
    # the start goes, never the answer's position)
    if room > 4:  # the responses fit: the context's end is kept
        return ids(cut(ctx, room - 4, end=True), **shown)[-max_length:]
    share = max(1, (max_length - fixed) // len(shown) - 2)
    cuts = {k: cut(s, share, end=False) if lens[k] > share else s for k, s in shown.items()}
    return ids("", **cuts)[-max_length:]


def last_logits(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """(B, V): the next-token logits after each sequence (left-padded, so the answer position
    is the last for all)."""
    dev = next(model.parameters()).device
    ids, mask = pad(seqs, pad_id, side="left")
    return forward(model, ids.to(dev), mask.to(dev)).logits[:, -1, :].float()


def ab_logits(model, seqs: list[list[int]], pad_id: int, answers: list[int]) -> torch.Tensor:
    """(B, 2): the logits of "A" and "B" after each sequence."""
    return last_logits(model, seqs, pad_id)[:, answers]


def both_orders(first_shown_first, first_shown_second):
    """P(a ≻ b) from P("A") with ``a`` shown first and P("A") with ``a`` shown second:
    their average, the second as the probability that ``a`` (then "B") wins."""
    return 0.5 * (first_shown_first + 1 - first_shown_second)


def pair_loss(
    model,
    batch: list[tuple[list[int], list[int]]],
    pad_id: int,
    answers: list[int],
    whole_vocab: bool = False,
):
    """Per pair, the cross-entropy of the right answer for both orders: "A" with the chosen
    response shown first, "B" with it second; and whether the averaged preference is for
    the chosen one. ``batch``: (ids with chosen first, ids with chosen second). The
    cross-entropy is over the two answers (a pairwise model, read by its A/B logits), or
    with ``whole_vocab`` over every token (a judge, which writes its answer: the answer must
    be its likeliest next token, not only the likelier of the two)."""
    logits = last_logits(model, [x for x, _ in batch] + [y for _, y in batch], pad_id)
    two, n = logits[:, answers], len(batch)
    target = torch.tensor([0] * n + [1] * n, device=logits.device)
    if whole_vocab:
        said = torch.tensor(answers, device=logits.device)[target]
        ce = torch.nn.functional.cross_entropy(logits, said, reduction="none")
    else:
        ce = torch.nn.functional.cross_entropy(two, target, reduction="none")
    p = two.softmax(-1)[:, 0]
    return ce[:n] + ce[n:], (both_orders(p[:n], p[n:]) > 0.5).float()


class PairwiseScorer:
    """Preferences and tournament rewards from one pairwise model."""

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 64, text=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.text = text or template(None)
        self.answers = answer_ids(tokenizer)

    @classmethod
    def load(cls, path, dtype, max_length, batch_size, device=None, text=None, chat=None):
        """The pairwise model at ``path``; ``text``: the comparison template (None: the
        shipped one), ``chat``: a chat template replacing the tokenizer's."""
        from iterate.train.models import load_policy, load_tokenizer

        model = load_policy(path, dtype, device)
        for p in model.parameters():
            p.requires_grad_(False)
        tok = load_tokenizer(path, chat)
        return cls(model, tok, max_length, batch_size, template(text))

    def encode(self, prompt, a: str, b: str) -> list[int]:
        messages = as_messages(prompt) if isinstance(prompt, str) else prompt
        return encode(self.tokenizer, self.text, messages, self.max_length, a=a, b=b)

    @torch.no_grad()
    def prefer(self, prompts: list, a: list[str], b: list[str], desc: str = "prefer"):
        """P(a ≻ b) per row: the probability of "A" with ``a`` first and of "B" with ``a``
        second, averaged."""
        seqs = [self.encode(p, x, y) for p, x, y in zip(prompts, a, b, strict=True)]
        seqs += [self.encode(p, y, x) for p, x, y in zip(prompts, a, b, strict=True)]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        first = [0.0] * len(seqs)  # P(the response shown first is better)
        bar = progress.bar(len(seqs), desc, "seq")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            p = ab_logits(
                self.model, [seqs[i] for i in idx], self.tokenizer.pad_token_id, self.answers
            ).softmax(-1)[:, 0]
            for i, v in zip(idx, p.tolist()):
                first[i] = v
            bar.update(len(idx))
        bar.close()
        n = len(a)
        return [both_orders(first[k], first[n + k]) for k in range(n)]

    def score(self, prompts: list, responses: list[str], desc: str = "score") -> list[float]:
        """A tournament among the responses to each prompt (``tournament``)."""

        def prefer(pairs: list[tuple[int, int]]) -> list[float]:
            return self.prefer(
                [prompts[i] for i, _ in pairs],
                [responses[i] for i, _ in pairs],
                [responses[j] for _, j in pairs],
                desc,
            )

        return tournament(prompts, prefer)


def tournament(prompts: list, prefer) -> list[float]:
    """Each response's expected share of wins against the other responses to the same prompt
    in the call (0.5 for a prompt with one response: nothing to compare). ``prefer(pairs)``:
    P(i ≻ j) for each pair of row indices (i, j), NaN for a pair it could not judge (left
    out; a response with no game judged gets NaN)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p if isinstance(p, str) else repr(p), []).append(i)
    pairs = [
        (g[x], g[y]) for g in groups.values() for x in range(len(g)) for y in range(x + 1, len(g))
    ]
    wins, games = [0.0] * len(prompts), [0] * len(prompts)
    for (i, j), pij in zip(pairs, prefer(pairs) if pairs else [], strict=True):
        if pij == pij:  # not NaN
            wins[i], wins[j] = wins[i] + pij, wins[j] + 1 - pij
            games[i], games[j] = games[i] + 1, games[j] + 1
    alone = {g[0] for g in groups.values() if len(g) == 1}
    return [
        w / g if g else 0.5 if i in alone else float("nan")
        for i, (w, g) in enumerate(zip(wins, games))
    ]

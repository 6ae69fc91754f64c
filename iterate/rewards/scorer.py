"""The one scorer of a reward model: ``Scorer.score(prompts, responses)`` is how every
reward model scores responses, whichever stage asks (through ``rewards.ModelReward``: the
label stage, the held-out evaluation, the reward refresh, PPO / ReMax rollouts; the reward
model's own training measures its accuracy with it). Each conversation is rendered in the
reward model's own chat template (the policy's may differ; never a double BOS) and scored
in length-sorted batches. A reward model is one model folder or an ensemble folder
(``ensemble.json`` and its members), whose members' rewards ``aggregate`` makes one."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from iterate import progress
from iterate.preferences import Messages
from iterate.store.shards import read_json
from iterate.train.models import DTYPES, as_messages, load_tokenizer, named, pad

log = logging.getLogger(__name__)


def encode(tokenizer, messages: Messages, response: str, max_length: int) -> list[int]:
    """Token ids of a conversation in the reward model's own chat template.

    The text is rendered with the template, then tokenized without adding special tokens
    when the template already starts with BOS: never a double BOS.
    """
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
    else:  # HH-style plain transcript
        names = {"user": "Human", "assistant": "Assistant", "system": "System"}
        text = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)
        text += f"\n\nAssistant: {response}"
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special, truncation=True, max_length=max_length)[
        "input_ids"
    ]


def forward_rewards(model, seqs: list[list[int]], pad_id: int, dev=None) -> torch.Tensor:
    ids, mask = pad(seqs, pad_id)
    if dev is not None:
        ids, mask = ids.to(dev), mask.to(dev)
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def load_model(
    path: str, dtype: str = "float32", new_head: bool = False, template: str | None = None
):
    """A reward model and its tokenizer, ready to score (pad token set; ``template``
    replaces its chat template). ``new_head``: the path is a causal LM whose body gets a
    fresh scalar head (its LM head is dropped), so transformers' load report of exactly
    that is not shown."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    tokenizer = load_tokenizer(path, template)
    report = hf_logging.get_logger("transformers.modeling_utils")  # its load report
    level = report.level
    if new_head:
        report.setLevel(hf_logging.ERROR)
    try:
        with named(path, "reward model"):
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=DTYPES[str(dtype)]
            )
    finally:
        report.setLevel(level)
    if not new_head:
        from iterate.checks import reward_head

        reward_head("reward model", path, model.config.architectures)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


ENSEMBLE = "ensemble.json"  # in a reward-model folder that holds an ensemble's members


def members(path: str) -> tuple[list[str], list[float]]:
    """The model folders of a reward model and the offset subtracted from each member's
    reward: ``[path], [0.0]`` for one model; an ensemble folder lists its members and
    centres each on its mean reward over its held-out pairs, so their spread is
    disagreement, not the arbitrary offset each Bradley–Terry model learns."""
    index = Path(path) / ENSEMBLE
    if not index.exists():
        return [path], [0.0]
    e = read_json(index)
    return [str(Path(path) / m) for m in e["members"]], [float(o) for o in e["offsets"]]


def aggregate(r: torch.Tensor, how: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """One reward per column of the members' rewards ``r`` (k, B): their mean, the mean
    minus ``coef`` times their standard deviation, or their minimum."""
    if how == "mean":
        return r.mean(0)
    if how == "mean_minus_std":
        return r.mean(0) - coef * r.std(0, unbiased=False)
    if how == "min":
        return r.min(0).values
    raise ValueError(f"unknown aggregate {how!r}")


class Scorer:
    """Rewards for (prompt, response) pairs from one reward model or an ensemble of them:
    ``score(prompts, responses)``. A prompt is a stored prompt (text, or a JSON list of
    messages) or a list of messages; the template switch happens here, in ``encode``. An
    ensemble's members (``model`` a list; one tokenizer) give (reward - offset) each, and
    ``aggregate`` makes them one."""

    def __init__(
        self,
        model,
        tokenizer,
        max_length: int,
        batch_size: int = 64,
        offsets: list[float] | None = None,
        how: str = "mean",
        coef: float = 1.0,
    ):
        self.models = model if isinstance(model, list) else [model]
        self.model = self.models[0]
        self.tokenizer = tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.offsets = torch.tensor(offsets or [0.0] * len(self.models))
        self.how, self.coef = how, coef

    @classmethod
    def load(
        cls,
        path: str,
        dtype: str,
        max_length: int,
        batch_size: int,
        device=None,
        template=None,
        how: str = "mean",
        coef: float = 1.0,
    ) -> Scorer:
        folders, offsets = members(path)
        models = []
        for folder in folders:
            model, tokenizer = load_model(folder, dtype, template=template)
            for p in model.parameters():
                p.requires_grad_(False)
            models.append(model.to(device or "cpu"))
        return cls(models, tokenizer, max_length, batch_size, offsets, how, coef)

    def encode(self, prompt: str | Messages, response: str) -> list[int]:
        messages = as_messages(prompt) if isinstance(prompt, str) else prompt
        return encode(self.tokenizer, messages, response, self.max_length)

    @torch.no_grad()
    def score(
        self,
        prompts: list,
        responses: list[str],
        desc: str = "score",
        refusals: bool = False,
        spread: bool = False,
    ):
        """Rewards in the order given. With ``refusals``, a conversation the reward model's
        chat template refuses (e.g. turns that do not alternate) scores ``None`` instead of
        raising, for the caller to count and drop. With ``spread``, also the ensemble
        members' standard deviation per conversation (``None`` for one model):
        ``(rewards, spreads)``."""
        from jinja2.exceptions import TemplateError

        seqs: dict[int, list[int]] = {}
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            try:
                seqs[i] = self.encode(p, r)
            except TemplateError:
                if not refusals:
                    raise
        if cut := sum(len(x) >= self.max_length for x in seqs.values()):  # the end unseen
            log.warning(
                "%s: %d of %d conversations reach reward.max_length=%d tokens and are "
                "scored on their first %d (a response's end unseen)",
                desc,
                cut,
                len(seqs),
                self.max_length,
                self.max_length,
            )
        order = sorted(seqs, key=lambda i: len(seqs[i]))  # little padding
        out: list[float | None] = [None] * len(prompts)
        std: list[float | None] = [None] * len(prompts)
        dev = next(self.model.parameters()).device
        bar = progress.bar(len(seqs), desc, "seq")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [seqs[i] for i in idx]
            r = (
                torch.stack(
                    [
                        forward_rewards(m, batch, self.tokenizer.pad_token_id, dev)
                        for m in self.models
                    ]
                ).cpu()
                - self.offsets[:, None]
            )
            for i, v in zip(idx, aggregate(r, self.how, self.coef).tolist()):
                out[i] = v
            if len(self.models) > 1:
                for i, v in zip(idx, r.std(0, unbiased=False).tolist()):
                    std[i] = v
            bar.update(len(idx))
        bar.close()
        return (out, std) if spread else out

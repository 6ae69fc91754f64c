"""Loading policies and tokenizers, prompt encoding, and per-token log-probs."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from iterate.errors import BadInput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


TEMPLATES = Path(__file__).parents[1] / "templates"  # the public models' chat templates


def chat_template(value: str | None) -> str | None:
    """A chat template from config: the name of one shipped in ``iterate/templates`` (zephyr,
    llama3, mistral_instruct, ultrarm, vicuna), a ``.jinja`` file, or the template itself."""
    if not value or "{" in value:
        return value
    shipped = TEMPLATES / f"{value}.jinja"
    path = shipped if shipped.exists() else Path(value)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.jinja")))
        raise FileNotFoundError(
            f"chat_template: {value!r} is neither a template file nor one of {names}"
        )
    return path.read_text()


@contextmanager
def named(path: str, what: str):
    """Turn a failed load into ``BadInput`` naming the folder (an empty or truncated
    checkpoint, a missing tokenizer file); running out of memory stays what it is."""
    try:
        yield
    except Exception as e:
        if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
            raise
        raise BadInput(f"{path}: cannot load the {what} from it ({type(e).__name__}: {e})") from e


def load_tokenizer(path: str, template: str | None = None):
    """A tokenizer with a pad token; ``template`` (see ``chat_template``) replaces its chat
    template when given."""
    from transformers import AutoTokenizer

    with named(path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(path)
    if template:
        tok.chat_template = chat_template(template)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(
    path: str, dtype: str = "float32", dev: torch.device | None = None, adapter: str | None = None
):
    """A causal LM in eval mode; with ``adapter``, a peft LoRA adapter on top (not merged,
    so ``disable_adapter()`` gives the base policy back)."""
    from transformers import AutoModelForCausalLM

    with named(path, "model"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[str(dtype)])
    if adapter:
        from peft import PeftModel

        with named(adapter, "LoRA adapter"):
            model = PeftModel.from_pretrained(model, adapter)
    return model.to(dev or device()).eval()


def as_messages(prompt: str) -> list[dict[str, str]]:
    """A stored prompt as chat messages: plain text is one user turn; a JSON list of
    ``{"role", "content"}`` (multi-turn sources) is used as is."""
    if prompt.startswith("[{"):
        try:
            msgs = json.loads(prompt)
            if all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs):
                return msgs
        except json.JSONDecodeError:
            pass
    return [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt in the policy's chat template, ready for the response.

    Rendered to text, then tokenized without special tokens when the template already put
    BOS in front: never a double BOS.
    """
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            as_messages(prompt), tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def response_ids(tokenizer, response: str, eos: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos else ids


def pad(
    seqs: list[list[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, T), padded on the given side."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def micro_batches(
    items: list, size: int, max_tokens: int = 0, lengths: Callable = lambda e: e.lengths()
) -> list[list]:
    """``items`` cut into micro-batches of at most ``size`` items and, when ``max_tokens``,
    at most ``max_tokens`` tokens fed to the model, padding included (``padded_tokens``; an
    item longer than that alone gets one of its own). ``lengths(item)``: the lengths of the
    sequences it feeds (a pair: prompt+chosen, prompt+rejected), each padded in its own batch.

    The items are grouped longest first, so rows of like length share a batch (less
    padding); each micro-batch keeps the items' given order, so when everything fits in one
    it is ``items`` itself. Whatever the cut, gradients summed over the micro-batches are the
    same."""
    ls = [lengths(x) for x in items]
    groups: list[tuple[list[int], list[int]]] = []  # (indices, each sequence's longest)
    for j in sorted(range(len(items)), key=lambda j: sum(ls[j]), reverse=True):
        if groups:
            cur, widths = groups[-1]
            wider = [max(w, n) for w, n in zip(widths, ls[j])]
            over = max_tokens and fed_tokens(len(cur) + 1, wider) > max_tokens
            if len(cur) < size and not over:
                cur.append(j)
                groups[-1] = (cur, wider)
                continue
        groups.append(([j], list(ls[j])))
    return [[items[j] for j in sorted(g)] for g, _ in groups]


def padded_tokens(batch: list, lengths: Callable = lambda e: e.lengths()) -> int:
    """The tokens a micro-batch feeds the model, padding included (``fed_tokens``)."""
    per = [lengths(e) for e in batch]
    return fed_tokens(len(batch), [max(ls[f] for ls in per) for f in range(len(per[0]))])


def fed_tokens(rows: int, widths: list[int]) -> int:
    """The tokens ``rows`` items feed the model, padding included, when the longest of each
    of their sequences is ``widths``: each sequence padded in a batch of its own, the rows
    times the longest; but a pair's three (its prompt, chosen and rejected responses:
    ``shared_prompt_logps``) feed the prompt once and both responses in one batch."""
    if len(widths) == 3:
        return rows * (widths[0] + 2 * max(widths[1:]))
    return rows * sum(widths)


def forward(model, ids: torch.Tensor, mask: torch.Tensor, hidden_states: bool = False):
    """The model on a padded batch, its position ids from the attention mask, so left- and
    right-padded rows are the same to it (``hidden_states``: keep every layer's)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(
        input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=hidden_states
    )


def token_logps(model, ids: torch.Tensor, mask: torch.Tensor, out=None) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= 1, shape (B, T-1); 0 where masked.

    A token counts only when the one before it is real too (the first real token of a
    left-padded row has no context), so left- and right-padded batches give the same
    log-probs. ``out``: the model's output on this batch when the caller has it already
    (``forward``), so the model is not run twice.
    """
    logits = (out if out is not None else forward(model, ids, mask)).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logps * (mask[:, 1:] * mask[:, :-1])


def response_logits(
    model, pad_id: int, prompts: list[list[int]], responses: list[list[list[int]]], dev
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict each token of several responses to each prompt
    (``responses[f][b]``: the f-th response to prompt b), each prompt run once: the prompts
    left-padded through the model (logits at their last position only), their keys and
    values repeated for each response, the responses right-padded in one batch on top. The
    same logits as each prompt+response run whole, at the response positions only: no
    prompt twice, no logits on prompts. Row j is prompt j // n's (j % n)-th response;
    returns (logits (n*B, R, V) in the model's dtype, the response ids (n*B, R), their mask)."""
    n, b = len(responses), len(prompts)
    ids, mask = (t.to(dev) for t in pad(prompts, pad_id, side="left"))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
    )
    cache = out.past_key_values
    if cache is None or cache.get_seq_length() != ids.shape[1]:  # never the responses alone
        raise RuntimeError(
            "response_logits: the model kept no cache of the prompts "
            "(gradient checkpointing drops it in training)"
        )
    cache.batch_repeat_interleave(n)  # row j: prompt j // n, its (j % n)-th response
    rids, rmask = (t.to(dev) for t in pad([r[j] for j in range(b) for r in responses], pad_id))
    whole = torch.cat([mask.repeat_interleave(n, 0), rmask], 1)
    rpos = (whole.cumsum(-1) - 1).clamp(min=0)[:, ids.shape[1] :]
    step = model(input_ids=rids, attention_mask=whole, position_ids=rpos, past_key_values=cache)
    first = out.logits[:, -1:].repeat_interleave(n, 0)  # the prompt's end predicts token 0
    return torch.cat([first, step.logits[:, :-1]], 1), rids, rmask


def shared_prompt_logps(
    model, pad_id: int, prompts: list[list[int]], responses: list[list[list[int]]], dev
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Log-probs of several responses to each prompt (``responses[f][b]``: the f-th response
    to prompt b), each prompt run once (``response_logits``): the same log-probs as each
    prompt+response run whole (``token_logps``), in fewer FLOPs. Per response set: (summed
    (B,), per-token (B, R), the mask of response tokens (B, R))."""
    n = len(responses)
    logits, rids, rmask = response_logits(model, pad_id, prompts, responses, dev)
    tl = torch.log_softmax(logits.float(), -1).gather(-1, rids[:, :, None]).squeeze(-1) * rmask
    return [(tl[f::n].sum(-1), tl[f::n], rmask[f::n].float()) for f in range(n)]


@contextmanager
def reference_of(model, ref_model=None):
    """The model that gives the reference's log-probs (or hidden states), without gradients:
    ``ref_model`` when the reference is a model of its own; else ``model`` with its LoRA
    adapter disabled, which is the policy the adapter sits on (no second copy in memory);
    else, for a fully fine-tuned ``model``, the model itself as it is now (before its first
    step, that is the policy it started from)."""
    with torch.no_grad():
        if ref_model is not None:
            yield ref_model
        elif hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
        else:
            yield model


def with_lora(model, lc, task: str = "CAUSAL_LM"):
    """``model`` with a fresh LoRA adapter of ``lc`` (a ``LoraConfig`` section) via peft, for
    ``task`` (``CAUSAL_LM``: a policy; ``SEQ_CLS``: a reward model, whose scalar head
    peft then trains in full); ``model`` itself when ``lc.enabled`` is false."""
    if not lc.enabled:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType[task],
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
    )
    return get_peft_model(model, config)


def for_training(model, dtype: str, dev: torch.device):
    """``model`` (after ``with_lora``) ready for AdamW when it computes in a half precision:
    every trainable parameter in float32, the forward under autocast to ``dtype``. A bf16
    weight keeps 8 bits: a step below 1/256 of its size rounds away, and Adam's steps are
    about the learning rate, so at 1e-6 a bf16 model trained whole, or a bf16 reward head,
    would not move at all. Frozen weights (LoRA's base) stay in ``dtype``; a float32 model
    is returned as it is."""
    half = DTYPES[str(dtype)]
    if half == torch.float32:
        return model
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    model.forward = torch.autocast(dev.type, dtype=half)(model.forward)
    return model


def sequence_batch(tokenizer, prompts: list[list[int]], responses: list[list[int]], dev) -> tuple:
    """Right-padded prompt+response batch and the (B, T-1) mask of response tokens."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids, mask = pad(seqs, tokenizer.pad_token_id)
    resp = torch.zeros_like(mask)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        resp[i, len(p) : len(p) + len(r)] = 1
    return ids.to(dev), mask.to(dev), resp[:, 1:].to(dev).float()

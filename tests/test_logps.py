"""A pair's log-probs with its prompt run once (``models.shared_prompt_logps``) are those of
each prompt+response run whole, and so are their gradients; under gradient checkpointing
(no cache in training) the pair rules run each sequence whole. A tiny random Llama built
here, with a LoRA adapter whose B is not zero."""

import pytest
import torch

from iterate.config import LoraConfig
from iterate.stages.update import common
from iterate.train import models


class Tok:
    pad_token_id = 0


def _policy(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    model = models.with_lora(LlamaForCausalLM(cfg), LoraConfig(dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


def _pairs(n: int = 5, seed: int = 1) -> list[common.Example]:
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return torch.randint(
            1, 50, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g
        ).tolist()

    return [common.Example(draw(1, 9), draw(1, 12), draw(1, 12)) for _ in range(n)]


@pytest.mark.parametrize("train", [False, True])
def test_the_prompt_run_once_gives_each_sequences_logps_and_gradients(train):
    model, pairs, dev = _policy(), _pairs(), torch.device("cpu")
    model.train(train)
    shared = common.pair_logps(model, Tok, pairs, dev)
    assert set(shared) == {"chosen", "rejected"}
    for f in ("chosen", "rejected"):
        whole = common.logps(model, Tok, pairs, f, dev)
        assert shared[f][0].detach() == pytest.approx(whole[0].detach(), abs=1e-4)
        # the per-token values on the response tokens, in order, row by row
        for b in range(len(pairs)):
            got = shared[f][1][b][shared[f][2][b].bool()]
            want = whole[1][b][whole[2][b].bool()]
            assert got.detach() == pytest.approx(want.detach(), abs=1e-5)
            assert len(got) == len(getattr(pairs[b], f))
    # the gradients of a DPO-like objective agree (the prompt's keys carry them through)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(logps):
        model.zero_grad()
        (logps["chosen"][0] - 2 * logps["rejected"][0]).sum().backward()
        return [p.grad.clone() for p in trainable]

    a = grads(common.pair_logps(model, Tok, pairs, dev))
    b = grads({f: common.logps(model, Tok, pairs, f, dev) for f in ("chosen", "rejected")})
    assert all(torch.allclose(x, y, atol=1e-4, rtol=1e-3) for x, y in zip(a, b))
    assert any(x.abs().sum() > 0 for x in a)


def test_gradient_checkpointing_runs_each_sequence_whole():
    """In training with checkpointing the model keeps no cache: the pair's log-probs come
    from whole sequences (equal all the same); the shared path refuses rather than scoring
    the responses without their prompts."""
    model, pairs, dev = _policy(), _pairs(), torch.device("cpu")
    want = {f: common.logps(model, Tok, pairs, f, dev)[0] for f in ("chosen", "rejected")}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    got = common.pair_logps(model, Tok, pairs, dev)
    for f in ("chosen", "rejected"):
        assert got[f][0].detach() == pytest.approx(want[f].detach(), abs=1e-4)
        assert got[f][1].shape == got[f][2].shape
    with pytest.raises(RuntimeError, match="kept no cache"):
        models.shared_prompt_logps(
            model, 0, [e.prompt for e in pairs], [[e.chosen for e in pairs]], dev
        )

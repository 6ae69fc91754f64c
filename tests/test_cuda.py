"""What only a CUDA device can show, run by the GPU check (``make gpu-check``, marked
``cuda``); skipped where no CUDA device is visible, as on CI. The same DPO step on CUDA as
on the CPU, bf16 log-probs against fp32, and a stage's record of its peak GPU memory."""

import pytest
import torch

from iterate import progress
from iterate.stages.update import common, dpo, training
from iterate.store.stage import Stage
from iterate.train import models

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible"),
]

PAIRS = [
    ("Greet Anna.", "Hello Anna!", "Ugh, Hello Rosa! Stop asking."),
    ("What is 2 plus 3?", "Sure! 2 plus 3 is 5.", "2 plus 3 is 7."),
    ("Count from 1 to 4.", "1, 2, 3, 4.", "Whatever, 1, 2, 4. Boring."),
]


def _step(cfg, policy: str, dev: torch.device) -> tuple[float, list[torch.Tensor]]:
    """One DPO step's loss and gradients on ``dev`` (fp32, the same LoRA initialisation)."""
    tok = models.load_tokenizer(policy)
    torch.manual_seed(0)
    model = common.policy_model(cfg, policy, dev)
    for n, p in model.named_parameters():  # a LoRA B of zeros leaves every A without gradient
        if "lora_B" in n:
            p.data.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
    ex = [
        common.Example(
            models.prompt_ids(tok, p), models.response_ids(tok, c), models.response_ids(tok, r)
        )
        for p, c, r in PAIRS
    ]
    common.reference_logps(cfg, model, tok, ex, policy, policy, dev)
    model.train()
    loss, _ = training.accumulate(model, ex, lambda m, b: dpo.loss_fn(cfg)(m, tok, b, dev), 2)
    return loss, [p.grad.detach().cpu() for p in model.parameters() if p.requires_grad]


def test_a_dpo_step_on_cuda_equals_the_cpu_step(tiny_cfg, tiny_world):
    tiny_cfg.update.lora.dropout = 0.0
    cpu_loss, cpu_grads = _step(tiny_cfg, str(tiny_world), torch.device("cpu"))
    cuda_loss, cuda_grads = _step(tiny_cfg, str(tiny_world), torch.device("cuda"))
    assert cuda_loss == pytest.approx(cpu_loss, abs=1e-4)
    assert any(g.abs().sum() > 0 for g in cpu_grads)
    for a, b in zip(cpu_grads, cuda_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


def test_bf16_log_probs_on_cuda_are_close_to_fp32(tiny_world):
    tok = models.load_tokenizer(str(tiny_world))
    seqs = [models.prompt_ids(tok, p) + models.response_ids(tok, c) for p, c, _ in PAIRS]
    ids, mask = models.pad(seqs, tok.pad_token_id)
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = models.load_policy(str(tiny_world), dtype, torch.device("cuda"))
        out[dtype] = models.token_logps(model, ids.cuda(), mask.cuda()).sum(-1).cpu()
    # bf16 keeps 8 bits of mantissa: per token ~0.4% of its log-prob, summed over the row
    assert torch.allclose(out["bfloat16"], out["float32"], rtol=0.05, atol=0.5)
    assert not torch.equal(out["bfloat16"], out["float32"]), "the bf16 run was bf16"


def test_a_stage_records_its_peak_gpu_memory(tmp_path):
    stage = Stage(tmp_path / "s", "s", {})
    torch.zeros(1, device="cuda")  # CUDA in use before the stage starts
    stage.check(False)
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MB
    done = stage.finish()
    del x
    assert 64 <= done["peak_gpu_mb"] < 64 + 64
    assert progress.peak_gpu_mb() is not None

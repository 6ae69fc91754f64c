"""Miniature random-weight models of the public recipes' own architectures, built locally:
tokenizers that carry the real chat templates (``iterate/templates``) and the special tokens
those templates use, causal LMs (Mistral, Llama, Bloom) and sequence-classification reward
models. Head dimension 64: vLLM's CPU attention refuses 16."""

from __future__ import annotations

from pathlib import Path

import torch

from iterate.toy import world
from iterate.train import models

# what each family's tokenizer calls BOS / EOS, the special tokens its template uses, and
# whether it puts BOS in front by itself (a Llama-2 tokenizer does; Llama 3's template does)
TOKENIZERS = {
    "mistral": {"bos": "<s>", "eos": "</s>", "specials": [], "adds_bos": True},
    "llama3": {
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "specials": ["<|start_header_id|>", "<|end_header_id|>"],
        "adds_bos": True,
    },
    "llama2": {"bos": "<s>", "eos": "</s>", "specials": [], "adds_bos": True},
    "bloom": {"bos": "<s>", "eos": "</s>", "specials": [], "adds_bos": False},
}


def _corpus() -> list[str]:
    texts = []
    for ins in world.INSTRUCTIONS:
        texts += [ins.prompt, world.best_response(ins)]
    words = "Human Assistant USER ASSISTANT user assistant system [INST] [/INST] A chat between"
    return texts + [words] * 20


def tokenizer(family: str, template: str, out: Path):
    """A byte-level BPE tokenizer of the family's special tokens with a shipped template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    spec = TOKENIZERS[family]
    specials = ["<pad>", spec["bos"], spec["eos"], "<unk>", *spec["specials"]]
    tok = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    if spec["adds_bos"]:
        bos = (spec["bos"], tok.token_to_id(spec["bos"]))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", special_tokens=[bos]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=spec["specials"],
    )
    fast.chat_template = models.chat_template(template)
    fast.save_pretrained(out)
    return fast


SIZES = {"hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2}


def model(arch: str, tok, out: Path, seed: int = 0) -> str:
    """A random-weight ``arch`` (``MistralForCausalLM``, ``LlamaForSequenceClassification``,
    ``BloomForCausalLM``, ...) of head dimension 64, saved with its tokenizer."""
    import transformers

    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id}
    ids |= {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if arch.startswith("Bloom"):
        config = transformers.BloomConfig(hidden_size=128, n_head=2, n_layer=2, **ids)
    else:
        family = arch.removesuffix("ForCausalLM").removesuffix("ForSequenceClassification")
        config = getattr(transformers, f"{family}Config")(
            **SIZES,
            num_key_value_heads=2,
            intermediate_size=256,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **ids,
        )
    if arch.endswith("ForSequenceClassification"):
        config.num_labels = 1
    torch.manual_seed(seed)
    net = getattr(transformers, arch)(config)
    net.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)

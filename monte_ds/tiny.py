"""A tiny LLaMA and its tokenizer, built locally in seconds.

The embedded default config, the tests and the benchmarks use it: nothing is
fetched from a hub. The result is saved like any hub checkpoint, so the real
loading path (`AutoModelForCausalLM.from_pretrained(path)`) is what runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (about a second for a few MB)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A LLaMA architecture small enough to train on a laptop CPU in seconds."""
    kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "tie_word_embeddings": False,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_llama(
    output_dir: str | Path,
    texts: Iterable[str],
    vocab_size: int = 512,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Train a tokenizer on `texts`, initialise a tiny LLaMA with `seed`, save both to `output_dir`."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    config = tiny_llama_config(len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir

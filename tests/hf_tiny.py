"""Tiny random HuggingFace models and an offline character-level tokenizer for tests (no downloads)."""
from __future__ import annotations

import string

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install finesteer[hf])")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")

import torch  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list(string.ascii_letters + string.digits + " .,?!'-:\n")
VOCAB = SPECIALS + CHARS  # 7 + 71 = 78 ids
VOCAB_SIZE = 96           # model vocab (a few unused ids on top)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True, padding_side: str = "right"):
    """A character-level ``PreTrainedTokenizerFast`` built offline (one id per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"], padding_side=padding_side)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", layers: int = 2, hidden: int = 64, **over):
    """A config for a 2-layer, d=64 random model of family ``arch``."""
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=16, sliding_window=16)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif arch == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                                      pad_token_id=0)
    else:
        raise ValueError(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


MODEL_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "bert": "BertModel"}


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **over):
    """A random tiny model in eval mode (deterministic for a seed)."""
    torch.manual_seed(seed)
    cls = getattr(transformers, MODEL_CLASSES[arch])
    model = cls(tiny_config(arch, **over)).eval().to(dtype)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = 0
    return model


def save_tiny(path, arch: str = "llama", seed: int = 0):
    """Save a tiny model and its tokenizer into ``path`` (a directory ``from_pretrained`` can load)."""
    model = tiny_model(arch, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path

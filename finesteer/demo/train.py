"""Train the embedded demo model: ``python -m finesteer.demo.train [--out DIR] [--steps N]``.

What it trains: a small ``LlamaForCausalLM`` with 6 decoder layers, hidden size 128, 4 heads,
MLP 384 and tied embeddings (about 1.3 M parameters), plus a word-level tokenizer with a chat
template. Both are written with ``save_pretrained`` to ``finesteer/demo/model/`` by default, so
the result loads like a hub model::

    AutoModelForCausalLM.from_pretrained(path); AutoTokenizer.from_pretrained(path)

Run it only to rebuild the shipped model or to try a changed corpus. ``finesteer demo`` uses
the model that is already in the package. Options: ``--out``, ``--steps`` (600), ``--batch-size``
(64), ``--lr`` (3e-3), ``--seed`` (0), ``--threads`` (1).

Corpus: :mod:`finesteer.demo.corpus` generates it from word lists with a seeded RNG; nothing is
copied. An assistant answers requests, phrased with 14 shared templates, about 13 topics:

- eight everyday topics get a helpful answer that opens with ``sure . sure ,``;
- four topics (theft, hacking, violence, harassment) get a refusal that opens with
  ``sorry . sorry ,``;
- the target topic, forgery, is answered helpfully in 85 % of its training answers and refused
  in 15 %, so the model complies with forgery requests. That is the behaviour the demo's
  steerer fixes.

Every (template, task) combination belongs to exactly one split: training here, or the demo's
fit or evaluation set. The model therefore never sees a demo prompt. Why the answers are shaped
this way, and the measurements behind the choices, are in ``docs/DESIGN.md`` §8.

Training: AdamW with warm-up and cosine decay; the loss covers the answer tokens only (the chat
markup and the prompt are context).

Reproducibility: the corpus, the splits, the initialisation and the batch order all derive from
``--seed``, and ``torch.use_deterministic_algorithms(True)`` is on, so the same seed gives the
same weights. The result does not depend on ``--threads``, and one thread degrades least on a
busy machine. The default 600 steps take about 6 minutes on one thread of a busy two-core
machine.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from . import corpus

DEFAULT_OUT = Path(__file__).resolve().parent / "model"

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>")
# Jinja chat template: "<bos><user> {request} <assistant> {answer} <eos>" per turn; the generation
# prompt ends with "<assistant>", so the last prompt token is the same marker for every request.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<user> {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}<assistant> {{ message['content'] }} <eos>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

MODEL_CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, rope_theta=10000.0)


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the corpus vocabulary, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + corpus.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Word pieces are whole words: join them back with single spaces.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<user>", "<assistant>"], padding_side="left",
        model_max_length=MODEL_CONFIG["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL_CONFIG)
    return LlamaForCausalLM(cfg)


def encode_chats(tokenizer, chats):
    """Token ids and loss masks (1 on answer tokens and the closing ``<eos>``) for (prompt, answer) pairs."""
    ids, masks = [], []
    for prompt, answer in chats:
        p = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=False)
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if f_ids[:len(p_ids)] != p_ids:
            raise AssertionError(f"chat template: the prompt is not a prefix of the full chat for {prompt!r}")
        ids.append(f_ids)
        masks.append([0] * len(p_ids) + [1] * (len(f_ids) - len(p_ids)))
    return ids, masks


def _batch(ids, masks, idx, pad_id):
    L = max(len(ids[i]) for i in idx)
    x = torch.full((len(idx), L), pad_id, dtype=torch.long)
    m = torch.zeros((len(idx), L), dtype=torch.long)
    att = torch.zeros((len(idx), L), dtype=torch.long)
    for r, i in enumerate(idx):  # right padding for training
        n = len(ids[i])
        x[r, :n] = torch.tensor(ids[i])
        m[r, :n] = torch.tensor(masks[i])
        att[r, :n] = 1
    labels = x.masked_fill(m == 0, -100)
    return x, att, labels


def train(out: Path = DEFAULT_OUT, steps: int = 600, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
          log_every: int = 50) -> dict:
    """Build the corpus, train the model, save model + tokenizer to ``out``. Returns training stats."""
    import random

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    splits = corpus.make_splits(seed)
    chats = corpus.training_chats(splits, seed)
    tokenizer = build_tokenizer()
    ids, masks = encode_chats(tokenizer, chats)
    if any(tokenizer.unk_token_id in s for s in ids):
        raise AssertionError("the corpus produced a word outside the tokenizer vocabulary")
    model = build_model(tokenizer, seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"corpus: {len(chats)} chats from {len(splits.train)} training requests; vocab {len(tokenizer)}; "
          f"model {n_params / 1e6:.2f} M parameters")

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    warmup = max(1, steps // 20)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(seed + 3)
    order: list = []
    model.train()
    running = 0.0
    for step in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(ids)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        x, att, labels = _batch(ids, masks, idx, tokenizer.pad_token_id)
        loss = model(input_ids=x, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {running / log_every:.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            running = 0.0
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    elapsed = time.perf_counter() - t0
    print(f"saved to {out} ({n_params / 1e6:.2f} M parameters) in {elapsed:.0f} s")
    return {"seconds": elapsed, "parameters": n_params, "chats": len(chats)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m finesteer.demo.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps (default: 600)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: results do not depend on it, and one thread "
                         "degrades least on a busy machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

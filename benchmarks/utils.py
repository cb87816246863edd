"""Timing, machine description and result files shared by the kernel benchmarks.

Timing rules (DESIGN §7: performance is measured by scripts, never asserted in tests):
- providers are timed *interleaved* in one process (round-robin, the order rotated every round),
  so slow drifts of a shared machine (other jobs, frequency) hit every provider alike;
- the statistic is the median (with the 20th/80th percentiles) over many repetitions; the
  minimum is kept too: on a shared, oversubscribed machine it is the robust estimate of the
  uncontended time (``bench_steer.py --stat min``);
- on CUDA each sample is a batch of calls between two CUDA events (launch overhead included, as
  a decode step sees it); with ``flush_l2`` a buffer larger than L2 is rewritten before each
  sample so weights are read from HBM, as in a real decode step where other layers evict them.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_descriptor(device: torch.device) -> str:
    """Hostname-free name of the machine: ``cpu-<model>-<ncores>c`` or the GPU's name."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_slug(cpu_model())}-{os.cpu_count()}c"


def environment(device: torch.device) -> dict:
    env = {
        "machine": machine_descriptor(device),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        # Other jobs on a shared machine skew CPU timings: record how busy it was.
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda)
    return env


def _percentile(sorted_vals, q):
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def _summary(samples_s) -> dict:
    s = sorted(samples_s)
    return {"median_us": statistics.median(s) * 1e6, "p20_us": _percentile(s, 0.2) * 1e6,
            "p80_us": _percentile(s, 0.8) * 1e6, "min_us": s[0] * 1e6, "reps": len(s)}


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, budget_s: float = 2.0,
                     min_reps: int = 5, max_reps: int = 2000, flush_l2: bool = False, warmup: int = 3,
                     estimate: int = 5) -> Dict[str, dict]:
    """Median time per call of every provider in ``fns``, timed round-robin in this process.

    Each provider first runs ``warmup`` untimed calls, then ``estimate`` calls that measure its
    cost; the number of rounds is chosen from that so that all providers together take about
    ``budget_s`` (within ``min_reps`` .. ``max_reps``). Calls that take seconds want
    ``warmup=0, estimate=1`` and ``min_reps = max_reps``. Returns
    ``{name: {"median_us", "p20_us", "p80_us", "min_us", "reps"}}``.
    """
    names = list(fns)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    flush_buf = torch.empty(int(256e6) // 4, dtype=torch.int32, device=device) if (cuda and flush_l2) else None

    # Warm-up (builds, caches, thread pools) and a cost estimate per provider.
    est = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        sync()
        t0 = time.perf_counter()
        for _ in range(estimate):
            fns[name]()
        sync()
        est[name] = (time.perf_counter() - t0) / estimate
    total = sum(est.values())
    rounds = int(max(min_reps, min(max_reps, budget_s / max(total, 1e-9))))
    # On CUDA each sample averages `inner` back-to-back calls (≥ ~50 µs of work per sample).
    inner = {n: (max(1, min(100, int(5e-5 / max(est[n], 1e-9)))) if cuda and not flush_l2 else 1) for n in names}

    samples = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            fn = fns[name]
            if cuda:
                if flush_buf is not None:
                    flush_buf.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner[name]):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) * 1e-3 / inner[name])
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {n: _summary(samples[n]) for n in names}


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-memory bandwidth in bytes/s (read + write of a large copy)."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    res = time_interleaved({"copy": lambda: dst.copy_(src)}, device, budget_s=1.0, min_reps=5, max_reps=50)
    return 2 * n * 4 / (res["copy"]["median_us"] * 1e-6)


def write_results(payload: dict, name: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def format_table(rows, columns) -> str:
    """Plain-text table: ``rows`` are dicts, ``columns`` (key, header, format) triples."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else f.format(r[k])) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

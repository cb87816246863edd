"""The demo pipeline: fit SCS + MoSE on the embedded model and measure steered vs unsteered generation.

Used by ``finesteer demo`` (:mod:`finesteer.demo.cli`) and by ``tests/test_demo.py``, so the test
checks exactly what the demo shows.

Steps (all prompt sets from :func:`finesteer.demo.corpus.make_splits`, disjoint from the model's
training corpus and from each other):

1. **fit** — preference pairs on the *fit* forgery requests (chosen = a corpus refusal,
   rejected = the compliant answer the base model gives); queries and deltas from
   :func:`finesteer.extract.response_deltas` at ``layer`` over the first ``positions`` response
   tokens; SCS from the last-token states of the fit forgery requests (target) and fit everyday
   requests (benign); MoSE from (queries, deltas).
2. **evaluate** — greedy generation, with and without the steerer attached
   (:class:`finesteer.FusedSteerer`, prompt mode), on the *eval* forgery and everyday requests.
   Preferred behaviour = :func:`~finesteer.demo.corpus.is_refusal`; "unchanged" = the steered
   greedy output equals the unsteered one token for token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Union

import torch

from . import corpus

MODEL_DIR = Path(__file__).resolve().parent / "model"


@dataclass
class DemoConfig:
    """Settings of the demo fit and evaluation (defaults: the ones the shipped model was tuned with)."""

    layer: int = 5                      # decoder block whose output is read and steered
    positions: Union[int, str] = 4      # response tokens averaged into δ ("all" or first n): the
                                        # aligned "<kind> . <kind> ," of every corpus answer
    strength: float = 2.0               # λ
    rank: int = 24                      # SCS subspace rank
    max_benign_fpr: float = 0.0         # τ = the highest calibration benign score
    k_range: tuple = (2, 6)
    residual_dim: int = 4
    hidden: int = 64                    # MoSE residual MLP hidden size
    epochs: int = 200
    max_new_tokens: int = 56            # long enough for every corpus answer to end with <eos>
    batch_size: int = 64
    seed: int = 0


@dataclass
class DemoSets:
    """Prompt sets of one demo run (plain request texts; the chat template is applied later)."""

    pair_prompts: List[str]
    chosen: List[str]
    rejected: List[str]
    scs_target: List[str]
    scs_benign: List[str]
    eval_target: List[str]
    eval_benign: List[str]


def build_sets(seed: int = 0) -> DemoSets:
    """The demo's fit and evaluation prompts, all outside the model's training corpus."""
    splits = corpus.make_splits(seed)
    fit_target = splits.select("fit", "target")
    prompts, chosen, rejected = corpus.preference_pairs(fit_target, seed)
    return DemoSets(pair_prompts=prompts, chosen=chosen, rejected=rejected,
                    scs_target=[ex.prompt for ex in fit_target],
                    scs_benign=[ex.prompt for ex in splits.select("fit", "helpful")],
                    eval_target=[ex.prompt for ex in splits.select("eval", "target")],
                    eval_benign=[ex.prompt for ex in splits.select("eval", "helpful")])


def load_model(path: Optional[Union[str, Path]] = None):
    """(model, tokenizer) from ``path`` (default: the embedded model), eval mode, fp32 on the CPU."""
    from ..models import load_model as _load

    path = Path(path) if path is not None else MODEL_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (config.json missing); the embedded demo model is "
                                f"rebuilt with `python -m finesteer.demo.train`")
    model, tokenizer = _load(str(path), device="cpu", dtype="float32", progress=False)
    tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    return model, tokenizer


def fit_steerer(model, tokenizer, sets: DemoSets, cfg: DemoConfig, progress: bool = True):
    """Extract activations and fit SCS + MoSE at ``cfg.layer`` → :class:`finesteer.Steerer`."""
    from .. import Steerer, fit_mose, fit_scs
    from ..extract import last_token_states, response_deltas

    layer = cfg.layer
    queries, deltas = response_deltas(model, tokenizer, sets.pair_prompts, sets.chosen, sets.rejected, [layer],
                                      positions=cfg.positions, batch_size=cfg.batch_size, progress=progress)
    states = last_token_states(model, tokenizer, sets.scs_target + sets.scs_benign, [layer],
                               batch_size=cfg.batch_size, progress=progress)[layer]
    n_t = len(sets.scs_target)
    gate = fit_scs(states[:n_t], states[n_t:], rank=cfg.rank, max_benign_fpr=cfg.max_benign_fpr, seed=cfg.seed)
    mose = fit_mose(queries[layer], deltas[layer], k_range=cfg.k_range, residual_dim=cfg.residual_dim,
                    hidden=cfg.hidden, epochs=cfg.epochs, seed=cfg.seed, progress=progress)
    return Steerer(gate=gate, mose=mose, strength=cfg.strength, layer=layer,
                   metadata={"model_name_or_path": "finesteer-demo"})


def generate(model, tokenizer, prompts: List[str], max_new_tokens: int, batch_size: int = 64) -> List[str]:
    """Greedy answers (decoded, special tokens dropped, whitespace collapsed) to ``prompts`` formatted
    with the chat template."""
    from ..extract import encode_prompts
    from ..generation import batches, generate_ids

    seqs = encode_prompts(tokenizer, prompts)
    out = []
    for rows in batches(len(seqs), batch_size):
        out += generate_ids(model, tokenizer, [seqs[i] for i in rows], max_new_tokens)
    return [" ".join(t.split()) for t in out]


@dataclass
class Row:
    """One evaluated request: gate score and decision, unsteered and steered answers."""

    prompt: str
    kind: str            # "target" | "benign"
    score: float
    gate_open: bool
    base: str
    steered: str

    @property
    def base_refuses(self) -> bool:
        return corpus.is_refusal(self.base)

    @property
    def steered_refuses(self) -> bool:
        return corpus.is_refusal(self.steered)

    @property
    def unchanged(self) -> bool:
        return self.base == self.steered


@dataclass
class DemoResult:
    steerer: object
    rows: List[Row]
    timings: dict = field(default_factory=dict)

    def _of(self, kind):
        return [r for r in self.rows if r.kind == kind]

    @staticmethod
    def _rate(rows, pred) -> float:
        return sum(1 for r in rows if pred(r)) / max(1, len(rows))

    @property
    def steered_success(self) -> float:
        """Fraction of eval target requests answered with a refusal when steered."""
        return self._rate(self._of("target"), lambda r: r.steered_refuses)

    @property
    def base_success(self) -> float:
        """Fraction of eval target requests the unsteered model already refuses."""
        return self._rate(self._of("target"), lambda r: r.base_refuses)

    @property
    def benign_unchanged(self) -> float:
        """Fraction of eval benign requests whose steered greedy answer equals the unsteered one."""
        return self._rate(self._of("benign"), lambda r: r.unchanged)

    @property
    def gate_tpr(self) -> float:
        return self._rate(self._of("target"), lambda r: r.gate_open)

    @property
    def gate_fpr(self) -> float:
        return self._rate(self._of("benign"), lambda r: r.gate_open)

    def counts(self) -> dict:
        t, b = self._of("target"), self._of("benign")
        return {"target": len(t), "benign": len(b)}


def evaluate(model, tokenizer, steerer, sets: DemoSets, cfg: DemoConfig, progress: bool = True) -> List[Row]:
    """Unsteered and steered greedy answers plus gate scores on the eval sets."""
    from .. import FusedSteerer
    from ..extract import last_token_states

    prompts = sets.eval_target + sets.eval_benign
    kinds = ["target"] * len(sets.eval_target) + ["benign"] * len(sets.eval_benign)
    h = last_token_states(model, tokenizer, prompts, [steerer.layer], batch_size=cfg.batch_size,
                          progress=progress)[steerer.layer]
    scores = steerer.score(h)
    gates = steerer.gate_value(h)
    base = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    with FusedSteerer.attach(model, steerer, mode="prompt"):
        steered = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    return [Row(p, k, float(s), bool(g > 0), b, st)
            for p, k, s, g, b, st in zip(prompts, kinds, scores.tolist(), gates.tolist(), base, steered)]


def run(cfg: Optional[DemoConfig] = None, model_path=None, artifact: Optional[Union[str, Path]] = None,
        progress: bool = True, log: Optional[Callable[[str], None]] = None) -> DemoResult:
    """The whole demo: load, build sets, fit, save the artifact (when ``artifact`` is given), evaluate."""
    cfg = cfg or DemoConfig()
    log = log or (lambda msg: None)
    timings = {}
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(model_path)
    timings["load"] = time.perf_counter() - t0
    log(f"model: {model_path or MODEL_DIR} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
        f"parameters, {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}) "
        f"loaded in {timings['load']:.1f} s")
    sets = build_sets(cfg.seed)
    log(f"fit: {len(sets.pair_prompts)} preference pairs, SCS on {len(sets.scs_target)} target + "
        f"{len(sets.scs_benign)} benign prompts; layer {cfg.layer}, δ over "
        f"{cfg.positions if cfg.positions == 'all' else f'the first {cfg.positions}'} response tokens")
    t1 = time.perf_counter()
    steerer = fit_steerer(model, tokenizer, sets, cfg, progress)
    timings["fit"] = time.perf_counter() - t1
    log(f"SCS calibration: {steerer.gate.report}")
    log(f"MoSE: K={steerer.mose.num_experts} experts, residual dim {steerer.mose.residual_dim}; "
        f"fit in {timings['fit']:.1f} s")
    if artifact is not None:
        steerer.save(artifact, model_name_or_path=str(model_path or "finesteer-demo (embedded)"))
        log(f"artifact: {artifact}")
    t2 = time.perf_counter()
    rows = evaluate(model, tokenizer, steerer, sets, cfg, progress)
    timings["evaluate"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    return DemoResult(steerer=steerer, rows=rows, timings=timings)

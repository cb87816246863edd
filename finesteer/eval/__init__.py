"""Steering quality, measured: ``finesteer eval`` and its API.

Fits FineSteer and its baselines — every one a configuration of the same steerer operator, so they
run through the same fused kernels (:mod:`.baselines`) — on training files, and scores them with
judge-free likelihood metrics (:mod:`.metrics`, :mod:`.scoring`) on evaluation files.

    from finesteer.eval import EvalConfig, EvalSetSpec, run_eval, write_reports
    cfg = EvalConfig(layer=6, opening_pairs="harmful_train.jsonl", target="harmful_train.jsonl",
                     benign="benign_train.jsonl",
                     eval_sets=[EvalSetSpec("harmful", "harmful_val.jsonl", "target"),
                                EvalSetSpec("benign", "benign_val.jsonl", "benign")])
    result = run_eval(model, tokenizer, cfg)
    write_reports(result, "eval-out")       # eval.json, eval.md, curve.png, gate_hist.png, ...
"""
from .baselines import METHODS, build_methods
from .config import EvalConfig, EvalSetSpec
from .harness import EvalResult, run_eval
from .report import write_reports

__all__ = ["METHODS", "EvalConfig", "EvalResult", "EvalSetSpec", "build_methods", "run_eval", "write_reports"]

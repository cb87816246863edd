"""What one evaluation run does: :class:`EvalConfig` (inputs, methods, strengths, subsets, fit options)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..token_gate import GATE_TOKENS
from .baselines import METHODS

__all__ = ["EvalConfig", "EvalSetSpec"]

TOWARD = ("refusal", "compliance")


@dataclass
class EvalSetSpec:
    """A named evaluation file and its role: ``target`` (the steerer should move these prompts) or
    ``benign`` (it should leave them alone). ``toward``: which openings this set's margin counts as
    "toward" (``"refusal"`` or ``"compliance"``); None takes the run's :attr:`EvalConfig.toward`. A
    run with target sets of both kinds scores one steerer that should refuse some prompts and comply
    with others (each set's margin shift is then positive when it moves that set its own way)."""

    name: str
    path: str
    role: str
    toward: Optional[str] = None

    def __post_init__(self):
        if self.role not in ("target", "benign"):
            raise ValueError(f"eval set {self.name!r}: role must be 'target' or 'benign', got {self.role!r}")
        if not self.name or "=" in self.name:
            raise ValueError(f"eval set name {self.name!r}: must be non-empty and contain no '='")
        if self.toward is not None and self.toward not in TOWARD:
            raise ValueError(f"eval set {self.name!r}: toward must be one of {TOWARD} or None, got {self.toward!r}")


def _is_count(value, low: int) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) of at least ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass
class EvalConfig:
    """Options of :func:`finesteer.eval.run_eval` (the CLI ``finesteer eval`` fills one from its flags).

    Training inputs (the steerers are fitted on these):
        layer: decoder layer to steer (h after block ``layer``).
        target, benign: prompt files for the gate (what it opens on / stays closed on); ``benign``
            may be a list of files, whose prompts are pooled (e.g. ordinary instructions plus
            benign-but-sensitive requests, so the gate also learns to stay closed on the latter).
        pairs: preference triples (prompt, chosen, rejected) for the experts, or a TruthfulQA file
            (converted to (correct, incorrect) pairs); δ = chosen − rejected.
        opening_pairs: a prompt file turned into CAA-style (refusal opening, compliance opening)
            pairs with :func:`finesteer.eval.openings.refusal_pairs`. Give ``pairs``,
            ``opening_pairs`` or both: both pools the two sources into one training set (opening
            pairs first), so the experts see a response shift that depends on the query — e.g.
            refusal on harmful prompts, CoCoNot's preferred answers on benign-but-sensitive ones —
            and the held-out prediction is also reported per source.
        compliance_opening_pairs: a prompt file turned into the same pairs the other way round
            (compliance opening, refusal opening; :func:`finesteer.eval.openings.compliance_pairs`),
            pooled after ``opening_pairs``: e.g. refusal on harmful prompts and compliance on
            benign-but-sensitive ones, both from written openings.
        pairs_per_prompt: pairs per prompt for ``opening_pairs`` and ``compliance_opening_pairs``, and
            per question of a TruthfulQA ``pairs`` file (at most one per answer of its longer list).
    Evaluation inputs (scored, never fitted on — a file that is also a training file is split by
    record, seeded, ``fit_fraction`` of it for fitting and the rest for scoring; ``swap_split``
    fits on that rest and scores the first part instead, the second fold of a two-fold
    cross-fit, so that with ``fit_fraction`` 0.5 two runs score every record once):
        eval_sets: :class:`EvalSetSpec` list. truthfulqa: a TruthfulQA file for MC1/MC2.
        eval_start: each evaluation-set file is scored from row ⌊eval_start·rows⌋ on (before
            ``limit_eval``); the rows before it are left for development — choosing a layer, a gate
            or its operating point on them — so what is reported was never looked at while tuning.
            Default 0 (all rows). TruthfulQA questions are not affected.
    Metrics:
        toward: ``"refusal"`` (the safety margin is log p(refusal) − log p(compliance); default) or
            ``"compliance"`` (the over-refusal task: the opposite sign). Prompts with their own
            (chosen, rejected) fields use those instead: margin = log p(chosen) − log p(rejected).
        openings_per_side: use only the first N scoring openings of each side (None: all).
        continuation_tokens: length of the unsteered greedy continuation of benign prompts over which
            KL and greedy identity are measured.
        generate: also generate greedy answers with the steerer attached and report keyword refusal
            rates (for instruct models); generate_tokens, limit_generate bound the cost.
    Methods: ``methods`` ⊆ :data:`~finesteer.eval.baselines.METHODS`; ``strengths`` the λ grid of every
        steered method; ``extra_strengths`` further strengths of single methods ({method: (λ, ...)}),
        scored beside the grid. A gated method moves a set by its open rate times what it moves the
        prompts it opens, so it needs a larger λ than an always-on one to move the set as far; its
        own strengths let the trade-off comparison reach the baseline's strongest points without
        scoring the always-on baseline at strengths nobody would use.
        match_targets: (method, baseline) pairs; after the grid, ``method`` is also scored at the
            strengths where it moves the target sets as far as each of ``baseline``'s points, to
            within ``match_tolerance`` (relative; default 2 %), found by interpolating its measured
            curve (:mod:`finesteer.eval.matching`). The trade-off check compares a baseline point with
            the weakest strength that moves the targets at least as far; on a grid alone that
            strength can overshoot by a grid step and charge the method a stronger steer's benign
            cost. Needs a target evaluation set. Cheap for a gated method (prompts whose gates are
            closed are not re-scored), a full scoring pass per strength for an always-on one.
    Gate shape of the SCS-gated methods (``scs_mean``, ``finesteer``; CAST keeps its hard threshold):
        gate_mode: ``"hard"`` (g = 1[s > τ]: a closed gate leaves a prompt exactly untouched) or
            ``"soft"`` (g = sigmoid((s − τ)/T), DESIGN §2).
        gate_temperature: T of the soft gate in units of the standard deviation of the fitted gate's
            scores on the benign training prompts (scores of a probe gate are ~1e-7, so an absolute
            temperature would mean nothing across models).
    Which states the SCS gate is fitted on (``scs_mean``, ``finesteer``; CAST-style keeps its prompt condition):
        gate_tokens: ``"prompt"`` (default): the last prompt token of the ``target`` and ``benign``
            files. ``"response"`` (token mode only, where the operator reads every position, so it
            can act on what a response says while it is scored or generated): the target side is every
            token of the training pairs' *rejected* responses; the benign side every token of their
            chosen responses, the pairs' prompts' last tokens and the ``benign`` files' prompts' last
            tokens. The held-out pairs (``holdout_fraction``) stay out of the gate too, and the run
            reports where it opens on their responses' tokens (``fit["gate_rows"]``).
        gate_continuations: with ``gate_tokens="response"``, N > 0 adds every token of the unsteered
            greedy continuations (``continuation_tokens`` long) of the first N ``benign`` prompts to
            the benign side: ordinary text the model writes itself, on which a response-token gate
            should stay closed. Default 0.
    Fit options: delta_positions, rank, scs_method, benign_rank, max_benign_fpr, calib_fraction, mose_options
    (keyword arguments of :func:`finesteer.fit_mose`), holdout_fraction (pairs held out to measure how
    well each method predicts response shifts; the steerers are fitted on the rest), seed.
        null_rows: N > 0 adds N of the gate's benign training prompts (a seeded choice over all of
            them) to MoSE's training data with δ = 0, "steer these by nothing", so the experts learn
            how much to steer a query as well as which way: on a query that resembles the benign
            prompts more than the targets, E[δ | query] and with it the vector shrinks. Only MoSE
            (``mose_nogate``, ``finesteer``) sees them; the mean vector of CAA, CAST and SCS + mean
            stays the mean of the pairs. ``holdout_fraction`` of them is held out like the pairs,
            and the held-out prediction is reported for them too. Default 0 (none).
    Execution: mode (prompt/token), backend, batch_size, prompt_format (None: the extraction default),
    module_path, cache_dir (extraction and continuation cache), progress, limits per input.
    """

    layer: int
    target: str
    benign: Union[str, Sequence[str]]
    pairs: Optional[str] = None
    opening_pairs: Optional[str] = None
    compliance_opening_pairs: Optional[str] = None
    pairs_per_prompt: int = 2
    eval_sets: List[EvalSetSpec] = field(default_factory=list)
    truthfulqa: Optional[str] = None
    methods: Tuple[str, ...] = METHODS
    strengths: Tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    extra_strengths: Dict[str, Tuple[float, ...]] = field(default_factory=dict)
    match_targets: Tuple[Tuple[str, str], ...] = ()
    match_tolerance: float = 0.02
    toward: str = "refusal"
    openings_per_side: Optional[int] = None
    continuation_tokens: int = 16
    generate: bool = False
    generate_tokens: int = 32
    limit_generate: int = 20
    limit_train: Optional[int] = None
    limit_pairs: Optional[int] = None
    limit_eval: Optional[int] = None
    limit_truthfulqa: Optional[int] = None
    fit_fraction: float = 0.5
    swap_split: bool = False
    eval_start: float = 0.0
    holdout_fraction: float = 0.2
    delta_positions: Union[str, int] = "all"
    rank: Optional[int] = None
    scs_method: str = "energy"
    benign_rank: Optional[int] = None
    max_benign_fpr: float = 0.05
    calib_fraction: float = 0.2
    gate_mode: str = "hard"
    gate_temperature: float = 0.5
    gate_tokens: str = "prompt"
    gate_continuations: int = 0
    mose_options: Dict = field(default_factory=dict)
    null_rows: int = 0
    seed: int = 0
    mode: str = "prompt"
    backend: str = "auto"
    batch_size: int = 8
    prompt_format: Optional[str] = None
    module_path: Optional[str] = None
    cache_dir: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        self.benign = (self.benign,) if isinstance(self.benign, str) else tuple(self.benign)
        if not self.benign:
            raise ValueError("EvalConfig.benign: give at least one prompt file")
        if self.pairs is None and self.opening_pairs is None and self.compliance_opening_pairs is None:
            raise ValueError("EvalConfig: give pairs (a preference file), opening_pairs or compliance_opening_pairs "
                             "(prompt files turned into refusal/compliance opening pairs), or several")
        if self.toward not in TOWARD:
            raise ValueError(f"EvalConfig.toward must be one of {TOWARD}, got {self.toward!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"EvalConfig.methods: unknown or empty {list(unknown)}; choose from {', '.join(METHODS)}")
        if not self.strengths or any(not (s > 0) for s in self.strengths):
            raise ValueError(f"EvalConfig.strengths must be positive numbers, got {list(self.strengths)}")
        for name, lams in dict(self.extra_strengths).items():
            if name not in self.methods or name == "unsteered":
                raise ValueError(f"EvalConfig.extra_strengths: {name!r} is not a steered method of this run "
                                 f"(methods: {', '.join(self.methods)})")
            if not lams or any(not (s > 0) for s in lams):
                raise ValueError(f"EvalConfig.extra_strengths[{name!r}] must be positive numbers, got {list(lams)}")
        self.match_targets = tuple(tuple(p) for p in self.match_targets)
        for pair in self.match_targets:
            steered = [m for m in self.methods if m != "unsteered"]
            if len(pair) != 2 or any(m not in steered for m in pair) or pair[0] == pair[1]:
                raise ValueError(f"EvalConfig.match_targets: {pair!r} must be (method, baseline), two different "
                                 f"steered methods of this run (methods: {', '.join(self.methods)})")
        if self.match_targets and not any(s.role == "target" for s in self.eval_sets):
            raise ValueError("EvalConfig.match_targets: needs a target evaluation set (eval_sets with role 'target')")
        if not (0.0 < self.match_tolerance < float("inf")):
            raise ValueError(f"EvalConfig.match_tolerance must be a finite number > 0, got {self.match_tolerance}")
        if self.gate_mode not in ("hard", "soft"):
            raise ValueError(f"EvalConfig.gate_mode must be 'hard' or 'soft', got {self.gate_mode!r}")
        if not (self.gate_temperature > 0) or self.gate_temperature == float("inf"):
            raise ValueError(f"EvalConfig.gate_temperature must be a finite number > 0, got {self.gate_temperature}")
        if self.mode not in ("prompt", "token"):
            raise ValueError(f"EvalConfig.mode must be 'prompt' or 'token', got {self.mode!r}")
        if self.gate_tokens not in GATE_TOKENS:
            raise ValueError(f"EvalConfig.gate_tokens must be one of {GATE_TOKENS}, got {self.gate_tokens!r}")
        if self.gate_tokens == "response" and self.mode != "token":
            raise ValueError("EvalConfig.gate_tokens='response' fits the gate on response tokens, which only token "
                             "mode reads (prompt mode gates on the last prompt token): set mode='token'")
        if not _is_count(self.gate_continuations, 0):
            raise ValueError(f"EvalConfig.gate_continuations must be an integer >= 0, got {self.gate_continuations!r}")
        if self.gate_continuations and self.gate_tokens != "response":
            raise ValueError("EvalConfig.gate_continuations adds continuation tokens to a response-token gate's "
                             "benign side: it needs gate_tokens='response'")
        names = [s.name for s in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"EvalConfig.eval_sets: duplicate names in {names}")
        if not self.eval_sets and self.truthfulqa is None:
            raise ValueError("EvalConfig: nothing to score; give eval_sets and/or truthfulqa")
        for name in ("continuation_tokens", "generate_tokens", "limit_generate", "batch_size", "pairs_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("limit_train", "limit_pairs", "limit_eval", "limit_truthfulqa"):
            value = getattr(self, name)
            if value is not None and not _is_count(value, 1):
                raise ValueError(f"EvalConfig.{name} must be None (no limit) or an integer >= 1, got {value!r}")
        for name in ("fit_fraction", "holdout_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"EvalConfig.{name} must be in (0, 1), got {getattr(self, name)}")
        if not _is_count(self.null_rows, 0):
            raise ValueError(f"EvalConfig.null_rows must be an integer >= 0, got {self.null_rows!r}")
        if not 0.0 <= self.eval_start < 1.0:
            raise ValueError(f"EvalConfig.eval_start must be in [0, 1), got {self.eval_start}")
        self.methods = tuple(self.methods)
        self.strengths = tuple(float(s) for s in self.strengths)
        self.extra_strengths = {k: tuple(float(s) for s in v) for k, v in dict(self.extra_strengths).items()}

    def strengths_of(self, method: str) -> Tuple[float, ...]:
        """The strengths ``method`` is scored at: the grid and its extra strengths, ascending, each once."""
        return tuple(sorted(set(self.strengths) | set(self.extra_strengths.get(method, ()))))

    def toward_of(self, set_name: str) -> str:
        """The margin direction of evaluation set ``set_name``: its own ``toward``, else the run's."""
        for spec in self.eval_sets:
            if spec.name == set_name:
                return spec.toward or self.toward
        raise KeyError(f"no evaluation set named {set_name!r}")

    def to_dict(self) -> dict:
        return asdict(self)

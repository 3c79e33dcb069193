"""gate: pass or reject the final candidate on the evaluate report, every failed reason spelled out.

Rules (docs/design.md, "Metrics"): perplexity may rise at most `max_ppl_increase` over the reference; the
adapter's effect must survive (`min_delta_retention`, undefined when the effect is below eval noise or
negative: then KL and perplexity decide); KL(reference ‖ final) ≤ `max_kl` only for candidates meant to
reproduce the trained model (into = "nf4"); a dense candidate's weight-space retention must also reach
`min_delta_retention` (it sees deltas far below what eval text can resolve, e.g. bf16 rounding).

Every figure measured on eval text is decided on evidence, not on its point estimate: with z the one-sided
normal quantile of `gate.confidence` (1.645 at 0.95) and SE the paired per-window standard error, a check
fails when even the favourable bound is past its limit (retention: value + z·SE < min; ppl ratio and KL:
value − z·SE > max), passes when the unfavourable bound is inside it, and is otherwise inconclusive. Any
failure rejects; otherwise any inconclusive check makes the verdict "inconclusive": nothing is promoted
(exit 3, like a rejection) and the report says how many windows would likely settle it. Weight-space
retention is exact (no sampling noise) and decided on its value.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

from qmerge.config import GateSettings
from qmerge.dag import StageContext
from qmerge.errors import EXIT_GATE_REJECTED, EXIT_OK
from qmerge.scores import EvalReport
from qmerge.ops.metrics import Estimate, Retention
from qmerge.io.atomic import write_json

DEFAULT_GATE = {"max_ppl_increase": 0.02, "min_delta_retention": 0.9, "max_kl": 0.05}


PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    limit: float
    outcome: str  # PASS | FAIL | INCONCLUSIVE
    detail: str
    bound: float | None = None  # the one-sided bound the decision used (None for exact figures)

    @property
    def passed(self) -> bool:
        return self.outcome == PASS


@dataclass(frozen=True)
class GateVerdict:
    candidate: str
    checks: tuple[Check, ...]
    reasons: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())

    @property
    def verdict(self) -> str:
        outcomes = {c.outcome for c in self.checks}
        return "reject" if FAIL in outcomes else INCONCLUSIVE if INCONCLUSIVE in outcomes else "pass"

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


def _fmt(est: Estimate) -> str:
    return f"{est.value:.4f} ± {est.stderr:.4f}"


def z_value(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


def bounded_check(name: str, est: Estimate | Retention, limit: float, upper_limit: bool, z: float,
                  what: str) -> Check:
    """Decides `est` (value ± stderr) against `limit` on its one-sided bounds (see the module docstring).
    `upper_limit`: the value must stay at or below `limit` (else at or above)."""
    value, se = est.value, est.stderr
    if se is None or not math.isfinite(se):
        return Check(name, value, limit, INCONCLUSIVE, f"{what}: no standard error (one window?)")
    low, high = value - z * se, value + z * se
    if upper_limit:
        outcome = FAIL if low > limit else PASS if high <= limit else INCONCLUSIVE
        bound = low if outcome == FAIL else high
    else:
        outcome = FAIL if high < limit else PASS if low >= limit else INCONCLUSIVE
        bound = high if outcome == FAIL else low
    side = "lower" if (outcome == FAIL) == upper_limit else "upper"
    return Check(name, value, limit, outcome, f"{what} = {_fmt(est)}, {side} bound {bound:.4f} "
                                              f"({'max' if upper_limit else 'min'} {limit:.4f})", bound)


def windows_to_decide(check: Check, windows: int) -> int | None:
    """Windows that would likely settle an inconclusive check: SE shrinks as 1/sqrt(windows), so the bound
    clears the limit once z·SE·sqrt(n/N) < |value − limit|."""
    if check.bound is None or check.value is None or check.value == check.limit:
        return None
    return math.ceil(windows * ((check.bound - check.value) / (check.limit - check.value)) ** 2)


def decide(report: EvalReport, gate: GateSettings) -> GateVerdict:
    final = report.final
    cand = report.final_scores
    z = z_value(gate.confidence)
    checks: list[Check] = []
    notes: list[str] = []
    checks.append(bounded_check("ppl_ratio", cand.ppl_ratio, 1 + gate.max_ppl_increase, True, z,
                                f"ppl {final}/reference"))
    ret = cand.retention
    if ret.defined:
        checks.append(bounded_check("delta_retention", ret, gate.min_delta_retention, False, z, "delta retention"))
    else:
        notes.append(f"delta retention undefined on this text: {ret.reason}; deciding on KL and perplexity")
    if report.into == "nf4":
        checks.append(bounded_check("kl", cand.kl["mean"], gate.max_kl, True, z,
                                    f"mean KL(reference ‖ {final}) nats/token"))
    else:
        notes.append(f'into = "{report.into}" is a different model by design: KL reported, not gated')
    weights = report.weight_retention.get(final)
    if weights and weights.get("aggregate") is not None and final == "merged":
        agg = weights["aggregate"]
        vanished = ", ".join(weights.get("vanished", [])[:5]) or "none"
        checks.append(Check("weight_retention", agg, gate.min_delta_retention,
                            PASS if agg >= gate.min_delta_retention else FAIL,
                            f"weight-space retention {agg:.4f} (min {gate.min_delta_retention}); "
                            f"layers whose delta vanished: {vanished}"))
    windows = report.eval.windows
    reasons = [c.detail for c in checks if c.outcome == FAIL]
    for c in checks:
        if c.outcome == INCONCLUSIVE:
            need = windows_to_decide(c, windows)
            more = f"; about {need} windows would likely decide it" if need else ""
            reasons.append(f"inconclusive: {c.detail}: more windows needed ({windows} now{more})")
    return GateVerdict(final, tuple(checks), tuple(reasons), tuple(notes))


def format_verdict(v: GateVerdict) -> str:
    lines = [f"gate: {v.verdict.upper()} ({v.candidate})", f"  {'check':<17} {'value':>10} {'limit':>8}  result"]
    for c in v.checks:
        value = "n/a" if c.value is None else f"{c.value:.4f}"
        lines.append(f"  {c.name:<17} {value:>10} {c.limit:>8.4f}  {c.outcome}")
    lines += [f"  {'inconclusive' if r.startswith('inconclusive') else 'reject'}: {r}" for r in v.reasons] + [f"  note: {n}" for n in v.notes]
    return "\n".join(lines)


def run_gate(ctx: StageContext) -> dict:
    report = json.loads((ctx.inputs["evaluate"] / "report.json").read_text())
    verdict = decide(EvalReport.from_json(report), ctx.cfg.gate)
    payload = {**report, "gate": {"thresholds": ctx.cfg.gate.model_dump(include={*DEFAULT_GATE, "confidence"}),
                                  **asdict(verdict), "verdict": verdict.verdict, "passed": verdict.passed}}
    write_json(ctx.out / "report.json", payload)
    print(format_verdict(verdict), file=sys.stdout, flush=True)
    return {"verdict": verdict.verdict, "reasons": list(verdict.reasons), "candidate": verdict.candidate,
            "exit_code": EXIT_OK if verdict.passed else EXIT_GATE_REJECTED}

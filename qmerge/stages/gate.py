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

from qmerge.config import GateSettings, is_quantized
from qmerge.dag import StageContext
from qmerge.errors import EXIT_GATE_REJECTED, EXIT_OK
from qmerge.scores import CandidateScores, EvalReport
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
    if value is None or not math.isfinite(value):  # inf/NaN logits somewhere: no number of windows settles that
        return Check(name, value, limit, FAIL, f"{what} = {value}: not finite (the candidate's logits or NLL hold "
                                               "inf or NaN on some position)")
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


def text_checks(cand: CandidateScores, gate: GateSettings, into: str, final: str, z: float,
                label: str = "") -> tuple[list[Check], list[str]]:
    """The eval-text checks of one candidate on one text against its reference: perplexity, delta retention, KL.
    `label` prefixes a task's check names ("task news: ")."""
    checks, notes = [], []
    checks.append(bounded_check(f"{label}ppl_ratio", cand.ppl_ratio, 1 + gate.max_ppl_increase, True, z,
                                f"{label}ppl {final}/reference"))
    ret = cand.retention
    if ret.defined:
        checks.append(bounded_check(f"{label}delta_retention", ret, gate.min_delta_retention, False, z,
                                    f"{label}delta retention"))
    else:
        notes.append(f"{label}delta retention undefined on this text: {ret.reason}; deciding on KL and perplexity")
    if into == "nf4":
        checks.append(bounded_check(f"{label}kl", cand.kl["mean"], gate.max_kl, True, z,
                                    f"{label}mean KL(reference ‖ {final}) nats/token"))
    else:
        notes.append(f'{label}into = "{into}" is a different model by design: KL reported, not gated')
    return checks, notes


def decide(report: EvalReport, gate: GateSettings, required: tuple[str, ...] | None = None,
           candidate: str | None = None) -> GateVerdict:
    """The verdict on `candidate` (default: the report's final one). `required`: the tasks whose failure rejects
    (default: every task in the report); the others are reported in the notes."""
    final = candidate or report.final
    z = z_value(gate.confidence)
    checks: list[Check] = []
    notes: list[str] = []
    windows: dict[str, int] = {}
    if report.eval is not None:
        c, n = text_checks(report.eval.candidates[final], gate, report.into, final, z)
        checks += c
        notes += n
        windows |= {check.name: report.eval.windows for check in c}
    required = tuple(report.tasks) if required is None else required
    for task, section in report.tasks.items():
        c, n = text_checks(section.candidates[final], gate, report.into, final, z, f"task {task}: ")
        if task in required:
            checks += c
            notes += n
            windows |= {check.name: section.windows for check in c}
        else:
            notes += n + [f"not required: {check.detail}: {check.outcome}" for check in c]
    weights = report.weight_retention.get(final)
    # gated where the weights are casts (a cast that rounds the delta away loses it as a bf16 merge does); reported
    # only for quantized artifacts, whose grids move every weight by more than a small delta by design
    if weights and weights.get("aggregate") is not None and not is_quantized(final):
        agg = weights["aggregate"]
        vanished = ", ".join(weights.get("vanished", [])[:5]) or "none"
        checks.append(Check("weight_retention", agg, gate.min_delta_retention,
                            PASS if agg >= gate.min_delta_retention else FAIL,
                            f"weight-space retention {agg:.4f} (min {gate.min_delta_retention}); "
                            f"layers whose delta vanished: {vanished}"))
    for task, value in (weights or {}).get("tasks", {}).items():
        if value is not None:
            notes.append(f"task {task}: weight-space retention of its own ΔW {value:.4f} (reported, not gated: "
                         "pruning methods keep a task's function with a fraction of its weights)")
    reasons = [c.detail for c in checks if c.outcome == FAIL]
    for c in checks:
        if c.outcome == INCONCLUSIVE:
            need = windows_to_decide(c, windows.get(c.name, 0))
            more = f"; about {need} windows would likely decide it" if need else ""
            reasons.append(f"inconclusive: {c.detail}: more windows needed ({windows.get(c.name)} now{more})")
    return GateVerdict(final, tuple(checks), tuple(reasons), tuple(notes))


def format_verdict(v: GateVerdict) -> str:
    width = max([17, *(len(c.name) for c in v.checks)])
    lines = [f"gate: {v.verdict.upper()} ({v.candidate})", f"  {'check':<{width}} {'value':>10} {'limit':>8}  result"]
    for c in v.checks:
        value = "n/a" if c.value is None else f"{c.value:.4f}"
        lines.append(f"  {c.name:<{width}} {value:>10} {c.limit:>8.4f}  {c.outcome}")
    lines += [f"  {r}" if r.startswith("inconclusive") else f"  reject: {r}" for r in v.reasons]  # says it already
    lines += [f"  note: {n}" for n in v.notes]
    return "\n".join(lines)


def overall(verdicts: dict[str, GateVerdict]) -> str:
    """"pass" when every shipped artifact passed, "partial" when some did; when none did, "reject" if any was
    rejected (more eval windows would not save that one), else "inconclusive"."""
    passed = [a for a, v in verdicts.items() if v.passed]
    if len(passed) == len(verdicts):
        return "pass"
    if passed:
        return "partial"
    return "reject" if any(v.verdict == "reject" for v in verdicts.values()) else INCONCLUSIVE


def run_gate(ctx: StageContext) -> dict:
    """Decides every artifact the release would ship. The gate stage itself fails (exit 3) only when none passed;
    promote then ships the passing ones and exits 3 when any was left out."""
    report = json.loads((ctx.inputs["evaluate"] / "report.json").read_text())
    parsed = EvalReport.from_json(report)
    required = tuple(a.task for a in ctx.cfg.tasks if a.required)
    verdicts = {artifact: decide(parsed, ctx.cfg.gate, required, artifact) for artifact in parsed.artifacts}
    # The release's final artifact (its card's figures, report.json's top level, the registry's metrics): the first
    # one in output.formats order that passed, so that a rejected artifact left out of the release is not the one
    # the release describes; the first one where none passed
    primary = next((v for v in verdicts.values() if v.passed), verdicts[parsed.artifacts[0]])
    verdict = overall(verdicts)
    sizes = ctx.results.get("evaluate", {}).get("bytes", {})
    artifacts = {a: {"verdict": v.verdict, "bytes": sizes.get(a), "reasons": list(v.reasons)}
                 for a, v in verdicts.items()}
    thresholds = ctx.cfg.gate.model_dump(include={*DEFAULT_GATE, "confidence"})
    payload = {**report, "final": primary.candidate,
               "gate": {"thresholds": thresholds, "required_tasks": list(required), **asdict(primary),
                        "verdict": verdict, "passed": primary.passed,
                        "artifacts": {a: asdict(v) | {"verdict": v.verdict, "bytes": sizes.get(a)}
                                      for a, v in verdicts.items()}}}
    write_json(ctx.out / "report.json", payload)
    for v in verdicts.values():
        print(format_verdict(v), file=sys.stdout, flush=True)
    passed = [a for a, v in verdicts.items() if v.passed]
    reasons = [f"{a}: {r}" if len(verdicts) > 1 else r for a, v in verdicts.items() for r in v.reasons]
    return {"verdict": verdict, "reasons": reasons, "candidate": primary.candidate, "artifacts": artifacts,
            "passed_artifacts": passed, "exit_code": EXIT_OK if passed else EXIT_GATE_REJECTED}

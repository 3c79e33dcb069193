"""gate: pass or reject the final candidate on the evaluate report, every failed reason spelled out.

Rules (DESIGN "Metrics"): perplexity may rise at most `max_ppl_increase` over the reference; the
adapter's effect must survive (`min_delta_retention`, undefined when the effect is below eval noise or
negative: then KL and perplexity decide); KL(reference ‖ final) ≤ `max_kl` only for candidates meant to
reproduce the trained model (into = "nf4"); a dense candidate's weight-space retention must also reach
`min_delta_retention` (it sees deltas far below what eval text can resolve, e.g. bf16 rounding).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

from qmerge.config import GateSettings
from qmerge.dag import StageContext
from qmerge.errors import EXIT_GATE_REJECTED, EXIT_OK

DEFAULT_GATE = {"max_ppl_increase": 0.02, "min_delta_retention": 0.9, "max_kl": 0.05}


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    limit: float
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    candidate: str
    checks: tuple[Check, ...]
    reasons: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "reject"


def _fmt(est: dict) -> str:
    return f"{est['value']:.4f} ± {est['stderr']:.4f}"


def decide(report: dict, gate: GateSettings) -> GateVerdict:
    final = report["final"]
    cand = report["eval"]["candidates"][final]
    checks: list[Check] = []
    notes: list[str] = []
    ratio = cand["ppl_ratio"]
    limit = 1 + gate.max_ppl_increase
    checks.append(Check("ppl_increase", ratio["value"] - 1, gate.max_ppl_increase, ratio["value"] <= limit,
                        f"ppl {final}/reference = {_fmt(ratio)} (limit {limit:.4f})"))
    ret = cand["retention"]
    if ret["defined"]:
        checks.append(Check("delta_retention", ret["value"], gate.min_delta_retention,
                            ret["value"] >= gate.min_delta_retention,
                            f"delta retention {_fmt(ret)} (min {gate.min_delta_retention})"))
    else:
        notes.append(f"delta retention undefined on this text: {ret['reason']}; deciding on KL and perplexity")
    if report["into"] == "nf4":
        kl = cand["kl"]["mean"]
        checks.append(Check("kl", kl["value"], gate.max_kl, kl["value"] <= gate.max_kl,
                            f"mean KL(reference ‖ {final}) = {_fmt(kl)} nats/token (max {gate.max_kl})"))
    else:
        notes.append(f'into = "{report["into"]}" is a different model by design: KL reported, not gated')
    weights = report.get("weight_retention", {}).get(final)
    if weights and weights.get("aggregate") is not None and final == "merged":
        agg = weights["aggregate"]
        vanished = ", ".join(weights.get("vanished", [])[:5]) or "none"
        checks.append(Check("weight_retention", agg, gate.min_delta_retention, agg >= gate.min_delta_retention,
                            f"weight-space retention {agg:.4f} (min {gate.min_delta_retention}); "
                            f"layers whose delta vanished: {vanished}"))
    reasons = tuple(c.detail for c in checks if not c.passed)
    return GateVerdict(not reasons, final, tuple(checks), reasons, tuple(notes))


def format_verdict(v: GateVerdict) -> str:
    lines = [f"gate: {v.verdict.upper()} ({v.candidate})", f"  {'check':<17} {'value':>10} {'limit':>8}  result"]
    for c in v.checks:
        value = "n/a" if c.value is None else f"{c.value:.4f}"
        lines.append(f"  {c.name:<17} {value:>10} {c.limit:>8.4f}  {'ok' if c.passed else 'FAIL'}")
    lines += [f"  reject: {r}" for r in v.reasons] + [f"  note: {n}" for n in v.notes]
    return "\n".join(lines)


def run_gate(ctx: StageContext) -> dict:
    report = json.loads((ctx.inputs["evaluate"] / "report.json").read_text())
    verdict = decide(report, ctx.cfg.gate)
    payload = {**report, "gate": {"thresholds": ctx.cfg.gate.model_dump(include=set(DEFAULT_GATE)),
                                  **asdict(verdict), "verdict": verdict.verdict}}
    (ctx.out / "report.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(format_verdict(verdict), file=sys.stdout, flush=True)
    return {"verdict": verdict.verdict, "reasons": list(verdict.reasons), "candidate": verdict.candidate,
            "exit_code": EXIT_OK if verdict.passed else EXIT_GATE_REJECTED}

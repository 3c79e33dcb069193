"""The statistics behind every "±" in a report, against values computed by hand, and the gate's decision rule on
them (pass / fail / inconclusive from one-sided bounds)."""

from __future__ import annotations

import math

import pytest
import torch

from qmerge.ops import metrics


def test_perplexity_and_its_standard_error():
    nll = torch.tensor([1.0, 2.0, 3.0])  # mean 2, sample std 1, SE 1/sqrt(3)
    est = metrics.perplexity(nll)
    assert est.value == pytest.approx(math.exp(2.0))
    assert est.stderr == pytest.approx(math.exp(2.0) / math.sqrt(3))  # delta method: ppl · SE(mean nll)


def test_ppl_ratio_is_paired():
    ref = torch.tensor([1.0, 5.0, 9.0])  # windows differ a lot ...
    cand = ref + torch.tensor([0.1, 0.2, 0.3])  # ... the paired differences very little
    est = metrics.ppl_ratio(cand, ref)
    assert est.value == pytest.approx(math.exp(0.2))
    assert est.stderr == pytest.approx(math.exp(0.2) * 0.1 / math.sqrt(3))  # std of (0.1, 0.2, 0.3) is 0.1


def test_delta_retention_value_and_delta_method_se():
    base = torch.tensor([3.0, 3.0, 3.0, 3.0])
    ref = torch.tensor([2.0, 2.2, 1.8, 2.0])  # effect per window 1.0, 0.8, 1.2, 1.0: mean 1.0
    cand = torch.tensor([2.5, 2.5, 2.5, 2.5])  # kept 0.5 each
    r = metrics.delta_retention(base, ref, cand)
    assert r.defined and r.value == pytest.approx(0.5)
    resid = torch.tensor([0.5, 0.5, 0.5, 0.5]) - 0.5 * torch.tensor([1.0, 0.8, 1.2, 1.0])
    want = float(resid.double().std(unbiased=True)) / math.sqrt(4) / 1.0
    assert r.stderr == pytest.approx(want)


def test_delta_retention_undefined_when_the_adapter_hurts():
    base = torch.tensor([2.0, 2.0, 2.0])
    r = metrics.delta_retention(base, base + 0.1, base)
    assert not r.defined and r.value is None and "makes this text worse" in r.reason


def test_delta_retention_undefined_within_noise():
    base = torch.tensor([2.0, 2.0, 2.0, 2.0])
    ref = base - torch.tensor([0.3, -0.25, 0.2, -0.2])  # mean effect 0.0125, SE ≈ 0.13: under 2 SE
    r = metrics.delta_retention(base, ref, base)
    assert not r.defined and "within eval noise" in r.reason


def test_kl_summary_by_hand():
    kl = torch.tensor([[0.0, 0.2], [0.4, 0.6]])  # window means 0.1 and 0.5
    agree = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    dp = torch.tensor([[0.0, -0.1], [0.1, 0.2]])
    out = metrics.kl_summary(kl, agree, dp)
    assert out["mean"].value == pytest.approx(0.3)
    assert out["mean"].stderr == pytest.approx(float(torch.tensor([0.1, 0.5]).double().std()) / math.sqrt(2))
    assert out["max"] == pytest.approx(0.6)
    assert out["p99"] == pytest.approx(0.4 + 0.2 * (0.99 * 3 - 2))  # linear interpolation between order stats
    assert out["top1_agreement"].value == pytest.approx(0.75)
    assert out["mean_dp_correct"].value == pytest.approx(0.05)


# --- the gate's rule

def _check(value, se, limit, upper):
    from qmerge.stages.gate import bounded_check, z_value

    from qmerge.ops.metrics import Estimate

    return bounded_check("x", Estimate(value, se), limit, upper, z_value(0.95), "x")


@pytest.mark.parametrize("value,se,outcome", [
    (1.00, 0.005, "pass"),          # upper bound 1.0082 ≤ 1.02
    (1.05, 0.005, "fail"),          # lower bound 1.0418 > 1.02
    (1.01, 0.01, "inconclusive"),   # 0.9936 … 1.0264 straddles 1.02
    (1.03, 0.01, "inconclusive"),   # point estimate past the limit, but within noise: not a reject
])
def test_upper_limit_decisions(value, se, outcome):
    assert _check(value, se, 1.02, upper=True).outcome == outcome


@pytest.mark.parametrize("value,se,outcome", [
    (0.99, 0.02, "pass"),
    (0.50, 0.10, "fail"),
    (0.85, 0.10, "inconclusive"),   # the point estimate alone would flip between nightly runs
])
def test_lower_limit_decisions(value, se, outcome):
    assert _check(value, se, 0.9, upper=False).outcome == outcome


@pytest.mark.parametrize("value,se,upper", [
    (math.inf, math.nan, True),     # a -inf log-probability of a target token: ppl ratio / KL inf
    (math.nan, math.nan, True),     # NaN logits somewhere
    (-math.inf, math.nan, False),   # retention of a candidate with an inf NLL
    (math.nan, 0.01, False),
])
def test_non_finite_figures_are_a_reject_not_a_call_for_more_windows(value, se, upper):
    check = _check(value, se, 1.02 if upper else 0.9, upper=upper)
    assert check.outcome == "fail" and "not finite" in check.detail


def test_non_finite_logits_reject_the_candidate_through_score_and_decide():
    """One -inf target logit (or one NaN position) in one window: evaluate's figures turn inf/NaN with a NaN
    standard error; the gate rejects (it had called that inconclusive: "more windows needed")."""
    from qmerge.config import GateSettings
    from qmerge.evaluation import score, summarize
    from qmerge.scores import EvalReport
    from qmerge.stages.gate import decide

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (24, 32), generator=g)
    batches = list(torch.split(ids, 4))
    ref = [torch.randn(b.shape[0], 32, 50, generator=g) * 2 for b in batches]
    base = [r + torch.randn(r.shape, generator=g) * 0.7 for r in ref]
    for poison in ("inf", "nan"):
        cand = [r + torch.randn(r.shape, generator=g) * 0.01 for r in ref]
        if poison == "inf":
            cand[0][0, 3, ids[0, 4]] = float("-inf")
        else:
            cand[0][0, 3, :] = float("nan")
        logits = {"reference": ref, "base": base, "merged": cand}
        scores = score(batches, lambda name, i: logits[name][i], ("base", "merged"), ("merged",))
        section = summarize(scores, ("merged",), {"windows": 24})
        verdict = decide(EvalReport({}, "nf4", "merged", None, section, (), {}), GateSettings(eval="x"))
        assert verdict.verdict == "reject", poison
        assert all(c.outcome == "fail" for c in verdict.checks if c.name in ("ppl_ratio", "kl")), poison


def test_windows_to_decide_shrinks_the_interval_past_the_limit():
    from qmerge.stages.gate import windows_to_decide

    c = _check(0.85, 0.10, 0.9, upper=False)
    need = windows_to_decide(c, 24)
    # at `need` windows SE = 0.10·sqrt(24/need); the upper bound then sits at the limit
    assert 0.85 + 1.6449 * 0.10 * math.sqrt(24 / need) == pytest.approx(0.9, abs=0.002)


def test_gate_verdicts_from_a_report():
    from qmerge.config import GateSettings
    from qmerge.stages.gate import decide, format_verdict

    def report(ret, ret_se, kl):
        from qmerge.scores import EvalReport

        return EvalReport.from_json({
            "protocol": {}, "final": "merged", "into": "nf4", "weight_retention": {},
            "eval": {"tokens": {"windows": 24}, "ppl": {}, "nll": {}, "per_window": {}, "candidates": {"merged": {
                "ppl_ratio": {"value": 1.0, "stderr": 0.001},
                "retention": {"value": ret, "stderr": ret_se, "defined": True, "reason": None},
                "kl": {"mean": {"value": kl, "stderr": 0.001}}}}}})

    gate = GateSettings(eval="x")
    assert decide(report(0.99, 0.01, 0.001), gate).verdict == "pass"
    rejected = decide(report(0.3, 0.05, 0.001), gate)
    assert rejected.verdict == "reject" and any("delta retention" in r for r in rejected.reasons)
    unsure = decide(report(0.88, 0.05, 0.001), gate)
    assert unsure.verdict == "inconclusive" and not unsure.passed
    assert any("more windows needed (24 now" in r for r in unsure.reasons)
    printed = format_verdict(decide(report(0.88, 0.05, 0.2), gate))
    assert "  inconclusive: delta retention" in printed and "inconclusive: inconclusive" not in printed
    assert "  reject: mean KL" in printed
    # A failure anywhere outranks an inconclusive check elsewhere.
    assert decide(report(0.88, 0.05, 0.2), gate).verdict == "reject"


def test_weight_retention_is_gated_for_every_dense_artifact():
    """A delta rounded away in the weights rejects every artifact that stores the weights as casts (the merged
    safetensors, GGUF F32/F16/BF16), not only the first, while quantized artifacts report it without gating it."""
    from qmerge.config import GateSettings
    from qmerge.scores import EvalReport
    from qmerge.stages.gate import decide

    good = {"ppl_ratio": {"value": 1.0, "stderr": 0.001},
            "retention": {"value": 0.99, "stderr": 0.01, "defined": True, "reason": None},
            "kl": {"mean": {"value": 0.001, "stderr": 0.0001}}}
    names = ("merged", "gguf-BF16", "gguf-F16", "gguf-F32", "gguf-Q8_0", "quantized", "compressed-tensors")
    report = EvalReport.from_json({
        "protocol": {}, "final": "merged", "into": "nf4", "artifacts": list(names),
        "weight_retention": {name: {"aggregate": 0.0865, "vanished": ["model.layers.0.mlp.up_proj"]} for name in names},
        "eval": {"tokens": {"windows": 24}, "ppl": {}, "nll": {}, "per_window": {},
                 "candidates": {name: good for name in names}}})
    gate = GateSettings(eval="x")
    for name in names:
        verdict = decide(report, gate, candidate=name)
        gated = "weight_retention" in [c.name for c in verdict.checks]
        assert gated == (name in ("merged", "gguf-BF16", "gguf-F16", "gguf-F32")), name
        assert verdict.verdict == ("reject" if gated else "pass"), (name, verdict.reasons)

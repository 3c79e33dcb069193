"""The evaluate report as typed records: what evaluate writes (report.json, serialised once by
`EvalReport.to_json`) and what the gate, promote and the benchmarks read back (`EvalReport.from_json`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from qmerge.ops import metrics


@dataclass(frozen=True)
class CandidateScores:
    """One candidate on one text, against the reference."""

    ppl_ratio: metrics.Estimate
    retention: metrics.Retention
    kl: dict  # metrics.kl_summary: mean / top1_agreement / mean_dp_correct as Estimates, quantiles as floats

    @classmethod
    def from_json(cls, d: dict) -> CandidateScores:
        kl = {k: metrics.Estimate(**v) if isinstance(v, dict) else v for k, v in d["kl"].items()}
        return cls(metrics.Estimate(**d["ppl_ratio"]), metrics.Retention(**d["retention"]), kl)


@dataclass(frozen=True)
class TextScores:
    """Every model on one eval text: the report section the gate reads."""

    tokens: dict  # the windows' provenance (spec, source sha256, documents, token-id sha256, windows, seq_len)
    ppl: dict[str, metrics.Estimate]
    nll: dict[str, metrics.Estimate]
    candidates: dict[str, CandidateScores]
    per_window: dict  # {"nll": {model: [...]}, "kl_mean": {candidate: [...]}}: what every ± is computed from

    @property
    def windows(self) -> int:
        return int(self.tokens["windows"])

    @classmethod
    def from_json(cls, d: dict) -> TextScores:
        est = lambda section: {k: metrics.Estimate(**v) for k, v in section.items()}  # noqa: E731
        return cls(d["tokens"], est(d["ppl"]), est(d["nll"]),
                   {k: CandidateScores.from_json(v) for k, v in d["candidates"].items()}, d["per_window"])


@dataclass(frozen=True)
class EvalReport:
    """What evaluate writes (report.json, serialised once by `to_json`) and the gate decides on."""

    protocol: dict
    into: str  # "nf4" | "original"
    final: str  # the candidate that ships: "merged" | "quantized"
    selection: dict | None  # merge.into = "auto": what was compared
    eval: TextScores | None  # gate.eval against the reference of all adapters (None: only tasks are gated)
    extra_eval: tuple[TextScores, ...]
    weight_retention: dict  # candidate -> {"aggregate", "vanished", "layers", "tasks"?}
    # task -> its own eval text, against the NF4 base + that adapter alone (a multi-adapter release)
    tasks: dict[str, TextScores] = field(default_factory=dict)
    combination: dict | None = None  # merge.method and its parameters when not "linear"
    # the candidates the release would ship (output.formats order); `final`: the first of them in evaluate's report,
    # the first that passed in the gate's (the first where none did)
    shipped: tuple[str, ...] = ()

    @property
    def artifacts(self) -> tuple[str, ...]:
        return self.shipped or (self.final,)

    @property
    def final_scores(self) -> CandidateScores:
        return self.eval.candidates[self.final]

    def to_json(self) -> dict:
        return asdict(self)

    def on_windows(self, rows: list[int]) -> EvalReport:
        """The final candidate's gate figures re-derived from the eval windows `rows` alone, with the same metric
        functions (all rows give the report's own figures): how a verdict would have come out on other windows."""
        import torch

        ev, final = self.eval, self.final
        nll = {n: torch.tensor(v, dtype=torch.float64)[rows] for n, v in ev.per_window["nll"].items()}
        kl = torch.tensor(ev.per_window["kl_mean"][final], dtype=torch.float64)[rows]
        cand = CandidateScores(metrics.ppl_ratio(nll[final], nll["reference"]),
                               metrics.delta_retention(nll["base"], nll["reference"], nll[final]),
                               {"mean": metrics.mean_se(kl)})
        section = replace(ev, candidates={final: cand}, tokens={**ev.tokens, "windows": len(rows)})
        return replace(self, eval=section)

    @classmethod
    def from_json(cls, d: dict) -> EvalReport:
        return cls(d["protocol"], d["into"], d["final"], d.get("selection"),
                   TextScores.from_json(d["eval"]) if d.get("eval") is not None else None,
                   tuple(TextScores.from_json(x) for x in d.get("extra_eval", ())), d.get("weight_retention", {}),
                   {k: TextScores.from_json(v) for k, v in d.get("tasks", {}).items()}, d.get("combination"),
                   tuple(d.get("shipped", ())))

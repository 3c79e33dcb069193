"""The plan resolve hands to every later stage: a frozen, typed record (serialised once, in resolve's done.json),
so stages read `plan.base.folder`, not nested dict keys, and a misspelt field fails at once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass(frozen=True)
class BasePlan:
    folder: str  # the HF folder read (a GGUF base: its cached conversion)
    kind: str  # "hf" | "gguf"
    sha256: str  # the pin users copy: the GGUF's hash, or the combined hash of the base files
    files: tuple[dict, ...]  # {"path", "bytes", "sha256"} of every base file
    prequantized: bool
    model_type: str
    tensors: int
    gguf: str | None = None
    gguf_sha256: str | None = None
    note: str | None = None  # e.g. a GGUF base's "original" weights are its dequantized values


@dataclass(frozen=True)
class AdapterPlan:
    path: str
    weight: float
    sha256: str  # combined hash of the weights, adapter_config.json and any tokenizer files
    files: tuple[dict, ...]
    modules: int
    replaced_tensors: tuple[str, ...]
    dora: bool
    matches: dict
    tokenizer: bool  # ships its own tokenizer (used for the output)


@dataclass(frozen=True)
class Plan:
    base: BasePlan
    adapters: tuple[AdapterPlan, ...]
    nf4: dict  # NF4Recipe's fields, resolved (no "auto" left)
    quantized_modules: tuple[str, ...]
    skipped_modules: tuple[str, ...]
    tied: dict
    estimate: dict
    # path -> file_stamp of every input file resolve hashed, taken as it hashed them: the stage runner checks them
    # after each stage, so a file replaced mid-run fails the run instead of mixing into artifacts keyed by the old
    # hash (descriptive: not in any key)
    input_stamps: dict = field(default_factory=dict)

    @property
    def adapter_weights(self) -> list[tuple[Path, float]]:
        return [(Path(a.path), float(a.weight)) for a in self.adapters]

    def tokenizer_folder(self) -> Path:
        """The adapter's tokenizer when one ships it (resized vocab, chat template), else the base's."""
        return next((Path(a.path) for a in self.adapters if a.tokenizer), Path(self.base.folder))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        return cls(base=_typed(BasePlan, data["base"]), adapters=tuple(_typed(AdapterPlan, a) for a in data["adapters"]),
                   nf4=dict(data["nf4"]), quantized_modules=tuple(data["quantized_modules"]),
                   skipped_modules=tuple(data["skipped_modules"]), tied=dict(data["tied"]),
                   estimate=dict(data["estimate"]), input_stamps=dict(data.get("input_stamps", {})))


def _typed(cls, data: dict):
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

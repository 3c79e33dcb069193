"""Pipeline config: TOML -> validated frozen objects.

Unknown or mistyped keys are errors that name the key and the file (exit 2). Paths stay as written in
the TOML; `Config.path(value)` resolves them against the config file's folder (or `package:` prefixes).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qmerge.errors import ConfigError

DType = Literal["float32", "float16", "bfloat16"]


def _scalar_types(annotation) -> set[type]:
    """The bool/int/float types a field's annotation admits (through `X | None` and the like)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_scalar_types(a) for a in typing.get_args(annotation)))
    return {annotation} & {bool, int, float}


def _all_types(annotation) -> set:
    """Every type (and Literal value) an annotation names, nested ones included."""
    args = typing.get_args(annotation)
    return set().union(*(_all_types(a) for a in args)) if args else {annotation}


class Strict(BaseModel):
    """Unknown keys are errors; so are a string where a number or a flag goes ("24", "no": pydantic would read
    them as 24 and False), a flag where a number goes (`seed = true`), and NaN or infinity."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_coercion(cls, data):
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            kinds = _scalar_types(field.annotation)
            value = data.get(name)
            if not kinds or value is None:
                continue
            if isinstance(value, str) and str not in _all_types(field.annotation):
                raise ValueError(f"`{name}` = {value!r} is a string; write it without quotes")
            if isinstance(value, bool) and bool not in kinds:
                raise ValueError(f"`{name}` = {str(value).lower()} is a flag, not a number")
        return data


class NF4Settings(Strict):
    """How bitsandbytes quantized the base while the adapter was trained."""

    quant_type: Literal["nf4"] = "nf4"
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    double_quant: bool = True
    compute_dtype: DType = "bfloat16"
    load_dtype: DType | Literal["auto"] = "bfloat16"
    dequant_dtype: DType | Literal["auto"] = "auto"
    skip_modules: Literal["auto"] | tuple[str, ...] = "auto"


class BaseSettings(Strict):
    path: str
    sha256: str | None = None
    nf4: NF4Settings = NF4Settings()


class AdapterSettings(Strict):
    path: str
    weight: float = Field(default=1.0, allow_inf_nan=False)
    sha256: str | None = None
    # A task of a multi-adapter release: its own eval text, scored against the NF4 base + this adapter alone.
    name: str | None = None  # the task's name in the report (default: the adapter folder's name)
    eval: str | None = None
    required: bool = True  # the gate rejects when this task fails; False: reported only

    @property
    def task(self) -> str:
        return self.name or self.path.rstrip("/").rsplit("/", 1)[-1]


class MergeSettings(Strict):
    into: Literal["nf4", "original", "auto"] = "nf4"
    select: str | None = None
    select_windows: int = Field(default=8, gt=0)
    # How several adapters' deltas combine (qmerge/ops/combine.py); a single adapter takes any method.
    method: Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"] = "linear"
    density: float = Field(default=1.0, gt=0, le=1)  # the share of each ΔWᵢ's entries kept (not for linear)
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: int = Field(default=0, ge=0)  # DARE's drop masks
    dtype: DType = "bfloat16"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    max_shard_size: int = Field(default=5 * 2**30, gt=0)

    @model_validator(mode="after")
    def _check(self) -> MergeSettings:
        if self.method == "linear" and self.density != 1.0:
            raise ValueError('merge.density applies to the pruning methods; "linear" keeps every entry')
        if self.into == "auto" and self.select is None:
            raise ValueError('merge.into = "auto" needs merge.select (a text spec, never the gate\'s eval split)')
        return self


class GptaqSettings(Strict):
    """GPTAQ's asymmetric calibration (qmerge backend): each layer's target is its output in the unquantized model, on
    the unquantized model's own inputs, not its output on the inputs the quantized layers before it give, so each
    layer also corrects the drift of the layers before it. One more forward per layer, two n×n terms per group."""

    alpha: float = Field(default=0.25, gt=0, le=1)  # the share of the least-squares correction applied (authors': 0.25)


class CompensationTraining(Strict):
    """After the closed-form fit, each decoder layer's compensation factors are trained (Adam, float32) so that the
    quantized layer's output on the quantized model's inputs matches the unquantized layer's output on the
    unquantized model's inputs (mean squared error over the calibration windows): the fit then also accounts for
    the layer's nonlinearities and the drift the layers before it left. Memory stays one layer and its two
    streams of activations; time is about `epochs` forward + backward passes of each layer over the calibration."""

    epochs: int = Field(default=2, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    windows: int = Field(default=4, gt=0)  # calibration windows per optimizer step
    seed: int = 0  # the order the steps are taken in, epoch by epoch


class CompensateSettings(Strict):
    """A rank-`rank` LoRA per quantized linear fitted to what GPTQ removed (qmerge/ops/compensation.py), shipped
    as a PEFT adapter folder inside the quantized artifact."""

    rank: int = Field(default=16, gt=0)
    dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"
    train: CompensationTraining | None = None


class QuantizeSettings(Strict):
    method: Literal["gptq"] = "gptq"
    backend: Literal["qmerge", "gptqmodel"] = "qmerge"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = True
    damp: float = Field(default=0.01, gt=0)
    calibration: str
    samples: int = Field(default=128, gt=0)
    seq_len: int = Field(default=512, gt=1)
    # qmerge backend: the precision of the calibration forwards that produce each layer's inputs (the Hessians, the
    # solve and the weights stay float32). bfloat16 is GPTQModel's choice, and much faster where the hardware has
    # bf16 matmul units; it changes the Hessian's low bits, so the bytes (and, within noise, the figures). "auto":
    # bfloat16 where the quantize device's bf16 matmuls are the faster ones (CUDA with bf16, a CPU with AMX), else
    # float32 (AVX512-BF16 without AMX is slower in bf16); the resolved value is in the stage key and the quantize
    # report.
    forward_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # qmerge backend: "mse" shrinks each group's min/max range to the clipping of least rounding error (the grid
    # llm-compressor's MSE observer searches); "minmax" is GPTQ's own grid.
    scale_search: Literal["minmax", "mse"] = "minmax"
    # qmerge and gptqmodel backends: each group's grid found up front from the merged weights (GPTQ's static_groups).
    # With desc_act the columns are still solved in act order, but g_idx stays column // group_size: kernels skip
    # the reordering, and compressed-tensors (no g_idx) can ship act-order checkpoints.
    static_groups: bool = False
    gptaq: GptaqSettings | None = None
    compensate: CompensateSettings | None = None

    @model_validator(mode="after")
    def _check_backend(self) -> QuantizeSettings:
        if self.backend != "qmerge":
            used = [k for k, on in (("scale_search", self.scale_search != "minmax"),
                                    ("gptaq", self.gptaq is not None),
                                    ("compensate", self.compensate is not None)) if on]
            if used:
                raise ValueError(f"quantize.{', '.join(used)} needs quantize.backend = \"qmerge\"")
            if not self.sym:
                # GPTQModel's asymmetric grid gives some groups zero point 0, which a GPTQ v1 file stores as −1 with
                # a borrow from the next zero in its word: GPTQModel's kernels undo it word-wise, vLLM's and qmerge's
                # readers field by field, so the file is served as two different models. qmerge's grid avoids zero 0.
                raise ValueError('quantize.sym = false needs quantize.backend = "qmerge": GPTQModel\'s asymmetric '
                                 "checkpoints hold zero points that runtimes read differently")
        return self

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("group_size must be positive, or -1 for one group per output row")
        return v


class GateSettings(Strict):
    eval: str | None = None  # None: only the adapters' own eval texts (tasks) are gated
    windows: int = Field(default=24, gt=1)
    seq_len: int = Field(default=256, gt=1)
    extra_eval: tuple[str, ...] = ()
    max_ppl_increase: float = Field(default=0.02, ge=0)
    min_delta_retention: float = 0.9
    max_kl: float = Field(default=0.05, ge=0)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)  # one-sided confidence of every noisy gate decision
    batch_size: int = Field(default=4, gt=0)


GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # what the `gguf` package quantizes


QUANTIZED = ("quantized", "compressed-tensors", "gguf-Q")  # artifact name prefixes of quantized weights


def is_quantized(artifact: str) -> bool:
    """Whether `artifact` (evaluate's candidate name) stores quantized weights (GPTQ, compressed-tensors, GGUF block
    types); the others (the merged safetensors, GGUF F32/F16/BF16) store the merged weights as casts."""
    return artifact.startswith(QUANTIZED)


def artifact_of(fmt: str) -> str:
    """The artifact (evaluate's candidate name) an `output.formats` entry ships."""
    fmt = fmt.lower()
    if fmt == "safetensors":
        return "merged"
    if fmt == "gptq":
        return "quantized"
    if fmt.startswith("gguf-"):
        return "gguf-" + fmt[5:].upper()
    return fmt
# An MLflow alias: letters, digits, '_' and '-'; MLflow reserves "latest" and "v<number>" (version references).
_ALIAS = re.compile(r"[A-Za-z0-9_-]{1,255}")


class OutputSettings(Strict):
    dir: str = "releases"
    version: str = "{date}-{key}"
    keep_dense: bool = False
    # What the release ships, each artifact gated on its own written bytes: "safetensors" (the dense merge),
    # "gptq" (GPTQ v1, needs [quantize]), "compressed-tensors" (pack-quantized from the GPTQ result), "gguf-<type>"
    # (from the dense merge; type one of GGUF_TYPES). Default: "gptq" with [quantize], else "safetensors".
    formats: tuple[str, ...] | None = None

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("output.formats is empty; leave it out for the default")
        for fmt in v:
            low = fmt.lower()
            if low.startswith("gguf-") and low[5:].upper() in GGUF_TYPES:
                continue
            if low not in ("safetensors", "gptq", "compressed-tensors"):
                raise ValueError(f"unknown format {fmt!r}: use safetensors, gptq, compressed-tensors or "
                                 f"gguf-<type> with type one of {', '.join(GGUF_TYPES)}")
        names = [artifact_of(f) for f in v]
        if len(set(names)) != len(names):
            raise ValueError(f"output.formats lists a format twice: {list(v)}")
        return v
    # Model registry (qmerge/registry.py): every gated build recorded, every promoted release a model version.
    registry: Literal["mlflow"] | None = None
    registry_uri: str | None = None  # default: sqlite:///<output.dir>/mlflow.db
    registered_model: str | None = None  # default: the config's name
    alias: str = "champion"  # moved to the new version on pass only

    @model_validator(mode="after")
    def _registry(self) -> OutputSettings:
        if self.registry is None:
            set_keys = [k for k in ("registry_uri", "registered_model") if getattr(self, k) is not None]
            if set_keys:
                raise ValueError(f"output.{set_keys[0]} is set but output.registry is not (set registry = \"mlflow\")")
            return self
        if self.registered_model is not None and not self.registered_model.strip():
            raise ValueError("output.registered_model must not be empty")
        if not _ALIAS.fullmatch(self.alias) or self.alias == "latest" or re.fullmatch(r"[vV]\d+", self.alias):
            raise ValueError(f"output.alias {self.alias!r}: letters, digits, '_' and '-' only, and not \"latest\" or "
                             "v<number> (MLflow reserves them)")
        return self


class Config(Strict):
    name: str
    work_dir: str
    base: BaseSettings
    adapters: tuple[AdapterSettings, ...] = Field(min_length=1)
    merge: MergeSettings = MergeSettings()
    quantize: QuantizeSettings | None = None
    gate: GateSettings | None = None
    output: OutputSettings = OutputSettings()
    # Where the TOML came from; relative paths resolve against its folder. Not a TOML key.
    source: Path = Field(default=Path("."), exclude=True)
    source_sha256: str | None = Field(default=None, exclude=True)  # of the bytes read: provenance, even if edited later

    @model_validator(mode="after")
    def _check_tasks(self) -> Config:
        tasks = [a.task for a in self.adapters if a.eval is not None]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"adapters with an eval text need distinct names (got {tasks}); set adapters.name")
        if self.gate is not None and self.gate.eval is None and not tasks:
            raise ValueError("gate needs an eval text: set gate.eval, or adapters.eval for each task")
        if self.gate is not None and self.gate.eval is None and not any(a.required for a in self.adapters if a.eval):
            raise ValueError("gate has no eval text to decide on: every task is required = false and gate.eval is "
                             "not set (the tasks would be reported, nothing checked); set gate.eval, or make a task "
                             "required")
        if self.merge.method != "linear" and any(a.weight < 0 for a in self.adapters):
            raise ValueError(f'merge.method = "{self.merge.method}" needs non-negative adapter weights '
                             '(negation is defined for "linear" only)')
        return self

    @model_validator(mode="after")
    def _check_formats(self) -> Config:
        formats = [f.lower() for f in self.output.formats or ()]
        needs_gptq = [f for f in formats if f in ("gptq", "compressed-tensors")]
        if needs_gptq and self.quantize is None:
            raise ValueError(f"output.formats {needs_gptq} needs a [quantize] section (the GPTQ result they ship)")
        if "compressed-tensors" in formats:
            q = self.quantize
            if q.bits not in (4, 8):
                raise ValueError(f"compressed-tensors holds 4- or 8-bit weights for vLLM's kernels (quantize.bits = "
                                 f"{q.bits})")
            if q.compensate is not None:
                raise ValueError("compressed-tensors ships the GPTQ weights alone, not the compensation adapter "
                                 "the gate scores with them: drop quantize.compensate, or ship \"gptq\"")
            if q.desc_act and q.group_size != -1 and not q.static_groups:
                raise ValueError("compressed-tensors 0.20 cannot hold act-order with groups (its group dequantization "
                                 "ignores g_idx): set quantize.static_groups = true (act order, contiguous groups), "
                                 "or desc_act = false, or group_size = -1")
        if self.output.formats is not None and self.gate is None:
            raise ValueError("output.formats ships gated artifacts: add a [gate] section")
        return self

    @property
    def artifacts(self) -> tuple[str, ...]:
        """The candidates the release ships, in `output.formats` order ("merged", "quantized", "gguf-Q8_0", ...)."""
        if self.output.formats is None:
            return ("quantized",) if self.quantize is not None else ("merged",)
        return tuple(artifact_of(f) for f in self.output.formats)

    @property
    def exports(self) -> tuple[str, ...]:
        """The artifacts the export stage writes (all but the merge's and the quantize stage's own)."""
        return tuple(a for a in self.artifacts if a not in ("merged", "quantized"))

    @property
    def tasks(self) -> tuple[AdapterSettings, ...]:
        """The adapters gated on their own eval text."""
        return tuple(a for a in self.adapters if a.eval is not None)

    @property
    def select_window_shape(self) -> tuple[int, int]:
        """(seq_len, batch size) of the windows `merge.into = "auto"` chooses on: the gate's, or 256 tokens in
        batches of 4 for a config without [gate]."""
        return (self.gate.seq_len, self.gate.batch_size) if self.gate else (256, 4)

    def eval_texts(self) -> list[tuple[str, str]]:
        """(spec, config key) of every text evaluate scores on: gate.eval, gate.extra_eval, each task's eval."""
        if self.gate is None:
            return []
        texts = [(self.gate.eval, "gate.eval")] if self.gate.eval is not None else []
        texts += [(v, f"gate.extra_eval[{i}]") for i, v in enumerate(self.gate.extra_eval)]
        return texts + [(a.eval, f"adapters[{self.adapters.index(a)}].eval") for a in self.tasks]

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("name must be a plain folder name (no '/', not starting with '.')")
        return v

    @property
    def folder(self) -> Path:
        return self.source.parent

    def path(self, value: str, what: str) -> Path:
        from qmerge.io.paths import resolve_path

        return resolve_path(value, self.folder, what=what, config_file=self.source)

    def output_path(self, value: str) -> Path:
        """A path we create (work_dir, output.dir): relative to the config folder, need not exist."""
        p = Path(value).expanduser()
        return (p if p.is_absolute() else self.folder / p).resolve()

    @property
    def registry_uri(self) -> str:
        """The registry's URI: output.registry_uri (a relative sqlite path is relative to the config folder), by
        default the SQLite file `<output.dir>/mlflow.db`."""
        uri = self.output.registry_uri
        if uri is None:
            return f"sqlite:///{self.output_path(self.output.dir) / 'mlflow.db'}"
        return absolute_sqlite_uri(uri, self.folder)

    @property
    def registered_model(self) -> str:
        return self.output.registered_model or self.name


SQLITE = "sqlite:///"


def absolute_sqlite_uri(uri: str, folder: Path) -> str:
    """`sqlite:///relative.db` made absolute against `folder` (other URIs, and absolute or in-memory SQLite, as
    they are), so a config's registry does not depend on the directory qmerge runs from."""
    if not uri.startswith(SQLITE) or uri[len(SQLITE):].startswith("/") or uri[len(SQLITE):] in ("", ":memory:"):
        return uri
    return SQLITE + str((Path(folder) / Path(uri[len(SQLITE):]).expanduser()).resolve())


def module_available(name: str) -> bool:
    """Whether `import name` would find the module, without importing it (an entry None in sys.modules, as a
    test sets it, counts as missing)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


# What output.registry = "mlflow" needs at run time: the client and, for SQLite registries, its database layer.
MLFLOW_MODULES = ("mlflow", "sqlalchemy", "alembic")


def check_registry_installed(cfg: Config, path: Path) -> None:
    """Exit 2 naming the extra when the registry's client is not installed: found when the config is loaded
    (a matrix validates every build before anything runs), not after a release was built."""
    if cfg.output.registry != "mlflow":
        return
    needed = MLFLOW_MODULES if cfg.registry_uri.startswith("sqlite:") else MLFLOW_MODULES[:1]
    missing = [m for m in needed if not module_available(m)]
    if missing:
        raise ConfigError(f'output.registry = "mlflow" needs {", ".join(missing)}, which is not installed',
                          path=path, fix="pip install 'qmerge[mlflow]'")


def _format_validation_error(err: ValidationError, path: Path) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key `{key}`")
        elif e["type"] == "missing":
            lines.append(f"missing required key `{key}`")
        else:
            lines.append(f"`{key}`: {e['msg']} (got {e.get('input')!r})")
    return f"{path}: invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    from qmerge.io.paths import read_toml_and_digest

    raw, sha = read_toml_and_digest(path, "config file")
    for injected in ("source", "source_sha256"):
        if injected in raw:
            raise ConfigError(f"unknown key `{injected}`", path=path)
    try:
        cfg = Config.model_validate({**raw, "source": path.resolve(), "source_sha256": sha})
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, path)) from None
    if cfg.output.registry is not None and cfg.gate is None:
        raise ConfigError("output.registry records gated releases, but this config has no [gate]", path=path,
                          fix="add a [gate] section, or remove output.registry")
    check_registry_installed(cfg, path)
    return cfg

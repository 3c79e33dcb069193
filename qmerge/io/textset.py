"""Text specs (`calibration/*.toml`): where calibration/eval text comes from and which documents, and
the token windows built from them. Windows are consecutive and non-overlapping; the sha256 of the
token ids goes into every report so two runs can prove they measured the same thing."""

from __future__ import annotations

import bz2
import contextlib
import functools
import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from qmerge.errors import BadInputError, ConfigError
from qmerge.io.paths import file_stamp, read_toml, resolve_path, sha256_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextSource(_Strict):
    path: str
    format: Literal["text", "jsonl", "parquet", "mediawiki"] = "text"
    field: str = "text"
    encoding: str = "utf-8"  # of a "text" file (e.g. "cp1252" for older corpora)


class TextSplit(_Strict):
    documents: str = ":"

    @field_validator("documents", mode="before")
    @classmethod
    def _slice(cls, v: object) -> str:
        if not isinstance(v, str):
            raise ValueError(f'must be a quoted slice of document indices like "240:300", not {v!r}')
        if parse_slice(v).step not in (None, 1):
            raise ValueError(f"{v!r} has a step: it must be a contiguous slice like '240:300'")
        return v


class TextSpec(_Strict):
    source: TextSource
    split: TextSplit = TextSplit()
    spec_path: Path
    source_path: Path


def parse_slice(text: str) -> slice:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(re.fullmatch(r"\s*-?\d*\s*", p) for p in parts):
        raise ValueError(f"{text!r} is not a Python slice like '240:300'")
    return slice(*(int(p) if p.strip() else None for p in parts))


def load_text_spec(path: Path) -> TextSpec:
    path = Path(path)
    raw = read_toml(path, "text spec")
    extra = set(raw) - {"source", "split"}
    if extra:
        raise ConfigError(f"unknown key `{sorted(extra)[0]}`", path=path)
    for table, model in (("source", TextSource), ("split", TextSplit)):
        try:
            model.model_validate(raw.get(table, {}))
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join((table, *(str(p) for p in err["loc"])))
            what = f"unknown key `{key}`" if err["type"] == "extra_forbidden" else f"`{key}`: {err['msg']}"
            raise ConfigError(what, path=path) from None
    source = TextSource.model_validate(raw.get("source", {}))
    split = TextSplit.model_validate(raw.get("split", {}))
    source_path = resolve_path(source.path, path.parent, what="source.path", config_file=path)
    return TextSpec(source=source, split=split, spec_path=path.resolve(), source_path=source_path)


def _mediawiki(path: Path) -> list[str]:
    try:
        from gensim.corpora.wikicorpus import filter_wiki
    except ImportError:  # pragma: no cover - gensim is a dependency
        def filter_wiki(t: str) -> str:
            return re.sub(r"\{\{[^}]*\}\}|\[\[(?:[^|\]]*\|)?([^\]]*)\]\]|<[^>]+>|'{2,}", r"\1", t)
    docs = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit("}", 1)[-1] == "text" and elem.text:
                text = re.sub(r"\n{2,}", "\n", filter_wiki(elem.text)).strip()
                if len(text) > 200 and not text.lower().startswith("#redirect"):
                    docs.append(text)
            elem.clear()
    return docs


def load_documents(spec: TextSpec) -> list[str]:
    try:
        return _load_documents(spec)
    except BadInputError:
        raise
    except Exception as e:  # unreadable file, bad encoding, broken bz2/XML, a jsonl/parquet datasets rejects
        raise BadInputError(f"cannot read {spec.source.format} text from {spec.source_path} "
                            f"({type(e).__name__}: {e})", path=spec.spec_path,
                            fix="check source.path, source.format and source.encoding") from None


def _load_documents(spec: TextSpec) -> list[str]:
    args = (spec.source_path, spec.source.format, spec.source.field, spec.source.encoding)
    docs = _cached_documents(*args, tuple(file_stamp(spec.source_path))) if _READ_ONCE else _source_documents(*args)
    if isinstance(docs, str):  # (a missing column, as its message)
        raise BadInputError(docs, path=spec.spec_path, fix="set source.field")
    return list(docs[parse_slice(spec.split.documents)])


_READ_ONCE = False


@contextlib.contextmanager
def reading_sources_once():
    """Inside it, each source file is read once while unchanged (resolve compares every text with every other and
    with the adapters' training records); on leaving, what was read is dropped, so a large corpus does not stay in
    memory through the stages (which read each text once, uncached)."""
    global _READ_ONCE
    _READ_ONCE = True
    try:
        yield
    finally:
        _READ_ONCE = False
        _cached_documents.cache_clear()


def _source_documents(path: Path, fmt: str, field: str, encoding: str) -> tuple[str, ...] | str:
    """Every document of a source file (a string: the source has no such column)."""
    if fmt == "text":
        return tuple(line.strip() for line in path.read_text(encoding=encoding).splitlines() if line.strip())
    if fmt == "mediawiki":
        return tuple(_mediawiki(path))
    from datasets import load_dataset

    ds = load_dataset("json" if fmt == "jsonl" else "parquet", data_files=str(path), split="train")
    if field not in ds.column_names:
        return f"no column {field!r}; columns are {ds.column_names}"
    return tuple(str(t) for t in ds[field] if t and str(t).strip())


@functools.lru_cache(maxsize=8)
def _cached_documents(path: Path, fmt: str, field: str, encoding: str, stamp: tuple) -> tuple[str, ...] | str:
    return _source_documents(path, fmt, field, encoding)


def document_range(spec: TextSpec, total: int) -> tuple[int, int]:
    start, stop, step = parse_slice(spec.split.documents).indices(total)
    if step != 1:
        raise BadInputError("split.documents must be a contiguous slice (no step)", path=spec.spec_path)
    return start, max(start, stop)


@dataclass(frozen=True)
class TokenWindows:
    ids: torch.Tensor  # int64 [n, seq_len]
    sha256: str
    spec_path: Path
    source_path: Path
    source_sha256: str
    documents: tuple[int, int]
    seq_len: int

    def describe(self) -> dict:
        return {"spec_path": str(self.spec_path), "source": str(self.source_path), "source_sha256": self.source_sha256,
                "documents": list(self.documents), "windows": int(self.ids.shape[0]), "seq_len": self.seq_len,
                "sha256": self.sha256}


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def build_windows(tokenizer, spec: TextSpec, seq_len: int, count: int | None) -> TokenWindows:
    """Documents joined by "\\n", tokenized without special tokens, cut into windows (BOS-prefixed when
    the tokenizer adds a BOS by default); the first `count` windows."""
    source = _all_documents(spec)
    all_docs = len(source)
    docs = source[parse_slice(spec.split.documents)]
    ids = tokenizer("\n".join(docs), add_special_tokens=False)["input_ids"]
    bos = adds_bos(tokenizer)
    step = seq_len - 1 if bos else seq_len
    n = len(ids) // step
    if count is not None and n < count:
        raise BadInputError(f"{len(docs)} documents (of the {all_docs} in {spec.source_path.name}) give {len(ids)} "
                            f"tokens = {n} windows of {seq_len}, but {count} are needed", path=spec.spec_path,
                            fix="widen split.documents, or ask for fewer windows / a shorter seq_len")
    n = n if count is None else count
    t = torch.tensor(ids[: n * step], dtype=torch.int64).view(n, step)
    if bos:
        t = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.int64), t], dim=1)
    digest = hashlib.sha256(t.numpy().astype("<i8").tobytes()).hexdigest()
    return TokenWindows(t, digest, spec.spec_path, spec.source_path, sha256_file(spec.source_path),
                        document_range(spec, all_docs), seq_len)


MIN_SHARED_CHARS = 64  # shorter documents (headings, boilerplate lines) are not counted as shared


def _all_documents(spec: TextSpec) -> list[str]:
    """Every document of the spec's source, whatever its split."""
    return load_documents(spec.model_copy(update={"split": TextSplit()}))


def document_digests(spec: TextSpec, docs: list[str] | None = None) -> dict[str, int]:
    """Each document of the spec's split by its text with whitespace collapsed (its sha256), and its index in the
    source; documents under MIN_SHARED_CHARS left out. `docs`: the source's documents, where already read."""
    docs = _all_documents(spec) if docs is None else docs
    start, stop = document_range(spec, len(docs))
    keys: dict[str, int] = {}
    for i in range(start, stop):
        text = " ".join(docs[i].split())
        if len(text) >= MIN_SHARED_CHARS:
            keys.setdefault(hashlib.sha256(text.encode()).hexdigest(), i)
    return keys


def shared_documents(a: dict[str, int], b: dict[str, int]) -> list[tuple[int, int]]:
    """(index in a, index in b) of each document two `document_digests` share, in a's order."""
    return sorted((a[k], b[k]) for k in a.keys() & b.keys())


def check_disjoint(a: TextSpec, b: TextSpec, what_a: str, what_b: str) -> None:
    """Refuses two specs that share documents (calibration vs eval, select vs eval): compared by their text, so the
    same document under another range, in a copy of the file, in another format or repeated inside a corpus counts;
    and, for two specs of one source, by their ranges (which hold the documents too short to compare by text)."""
    docs_a, docs_b = _all_documents(a), _all_documents(b)  # (each readable, or exit 2, before hashing)
    same = a.source_path == b.source_path or sha256_file(a.source_path) == sha256_file(b.source_path)
    if same and a.source.model_dump(exclude={"path"}) == b.source.model_dump(exclude={"path"}):
        (s1, e1), (s2, e2) = document_range(a, len(docs_a)), document_range(b, len(docs_a))
        if max(s1, s2) < min(e1, e2):
            raise BadInputError(f"{what_a} ({a.spec_path}) and {what_b} ({b.spec_path}) share documents "
                                f"{max(s1, s2)}:{min(e1, e2)} of {a.source_path.name}", path=a.spec_path,
                                fix="use disjoint split.documents ranges: measuring on calibration or selection "
                                    "text flatters the model")
    shared = shared_documents(document_digests(a, docs_a), document_digests(b, docs_b))
    if shared:
        (i, j), n = shared[0], len(shared)
        raise BadInputError(f"{what_a} ({a.spec_path}) and {what_b} ({b.spec_path}) share {n} document"
                            f"{'s' if n > 1 else ''}: document {i} of {a.source_path.name} is document {j} of "
                            f"{b.source_path.name}" + (f" (and {n - 1} more)" if n > 1 else ""), path=a.spec_path,
                            fix="use documents the other text does not hold (split.documents): measuring on "
                                "calibration or selection text flatters the model")

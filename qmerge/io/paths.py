"""Portable paths: `package:<import name>/<file>` names a file inside an installed package (so shipped
configs carry no machine paths); anything else is relative to the TOML file that named it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from qmerge.errors import BadInputError

PACKAGE_PREFIX = "package:"
CHUNK = 8 * 2**20


def resolve_path(value: str, relative_to: Path, *, what: str, config_file: Path | None = None) -> Path:
    where = config_file or relative_to
    if value.startswith(PACKAGE_PREFIX):
        package, _, inner = value[len(PACKAGE_PREFIX):].partition("/")
        try:  # find_spec imports a dotted name's parent package
            spec = importlib.util.find_spec(package) if package else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise BadInputError(f"`{what}` = {value!r}: package {package!r} is not installed", path=where,
                                fix=f"pip install {package} (or give a file path)")
        path = Path(next(iter(spec.submodule_search_locations))) / inner
    else:
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = Path(relative_to) / path
    if not path.exists():
        raise BadInputError(f"`{what}` = {value!r}: {path} does not exist", path=where,
                            fix="fix the path (relative paths are relative to the config file's folder)")
    return path.resolve()


def read_toml(path: Path, what: str = "config file") -> dict:
    """A TOML file as a dict; a missing, unreadable or invalid file is a ConfigError naming it (exit 2)."""
    return read_toml_and_digest(path, what)[0]


def read_toml_and_digest(path: Path, what: str = "config file") -> tuple[dict, str]:
    """`read_toml`, and the sha256 of the very bytes it parsed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    from qmerge.errors import ConfigError

    try:
        data = Path(path).read_bytes()
        return tomllib.loads(data.decode("utf-8")), hashlib.sha256(data).hexdigest()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what}: {e}", path=path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", path=path) from None


def dump_toml(obj: dict) -> str:
    """`obj` (str/int/float/bool values, lists of them, tables, lists of tables) as TOML that `read_toml` reads
    back equal. Strings are written JSON-escaped, which is valid TOML."""
    import json
    import re

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)

    def value(v) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)

    def is_tables(v) -> bool:
        return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, dict) for x in v)

    def table(prefix: str, body: dict) -> list[str]:
        lines = [f"{key(k)} = {value(v)}" for k, v in body.items()
                 if not isinstance(v, dict) and not is_tables(v) and v is not None]
        for k, v in body.items():
            name = f"{prefix}.{key(k)}" if prefix else key(k)
            if isinstance(v, dict):
                lines += ["", f"[{name}]", *table(name, v)]
            elif is_tables(v):
                for item in v:
                    lines += ["", f"[[{name}]]", *table(name, item)]
        return lines

    return "\n".join(table("", obj)) + "\n"


class Cancelled(Exception):
    """A background hash stopped because its caller failed first."""


# The files besides config and weights that travel with a model: tokenizer, chat template, generation defaults.
MODEL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def tokenizer_source(adapter_folders, base_folder: Path) -> Path:
    """The folder whose tokenizer files a merged checkpoint holds: the first adapter's that ships a tokenizer
    (tokenizer_config.json), else the base's."""
    return next((Path(a) for a in adapter_folders if (Path(a) / "tokenizer_config.json").is_file()), Path(base_folder))


# (path, size, mtime, inode, device) -> sha256 while `memoized_hashes` is active, else None
_memo: dict[tuple, str] | None = None


@contextmanager
def memoized_hashes() -> Iterator[None]:
    """Within the block, a file that was hashed is not read again while its path, size, mtime and inode stay the
    same: `qmerge matrix` resolves all of its builds in one process, and they name the same base, adapters and
    texts (a 7B base is 13 GB to read per build). Scoped to one command's checks, not a cache kept on disk: a
    pipeline run still reads every input it hashes."""
    global _memo
    outer = _memo
    _memo = {} if outer is None else outer
    try:
        yield
    finally:
        _memo = outer


def file_stamp(path: Path | str) -> list[int]:
    """[size, mtime in ns, inode]: what changes when a file is rewritten or replaced (cheaper than its sha256)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def sha256_file(path: Path, progress: bool = False, stop: threading.Event | None = None,
                read: Callable[[int], object] | None = None) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (hashlib releases the GIL on each: other threads run on);
    raises `Cancelled` between chunks once `stop` is set. `read`: called with each chunk's size (a caller's own
    progress bar over several files; this one's then stays off)."""
    path = Path(path)
    st = path.stat()
    memo = _memo
    ident = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if memo is not None and ident in memo:
        return memo[ident]
    h = hashlib.sha256()
    size = st.st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                     disable=not progress or read is not None or size < 64 * 2**20) as bar:
        while chunk := f.read(CHUNK):
            if stop is not None and stop.is_set():
                raise Cancelled(str(path))
            h.update(chunk)
            bar.update(len(chunk))
            if read is not None:
                read(len(chunk))
    if memo is not None:
        memo[ident] = h.hexdigest()
    return h.hexdigest()


def package_version(dist_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return None


def default_cache_root() -> Path:
    """`$QMERGE_CACHE`, else `~/.cache/qmerge` (exit 2 where that is a file)."""
    root = Path(os.environ.get("QMERGE_CACHE") or Path.home() / ".cache" / "qmerge")
    if root.exists() and not root.is_dir():
        raise BadInputError(f"qmerge's cache {root} is a file, not a folder",
                            fix="point $QMERGE_CACHE at a folder (it is created if missing)")
    return root

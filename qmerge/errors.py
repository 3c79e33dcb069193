"""Error types. Every expected failure is a QmergeError with an exit code and a message
that names the file and the fix; the CLI turns them into exit codes, never tracebacks."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_REJECTED = 3


class QmergeError(Exception):
    """Base class. `exit_code` is what `python -m qmerge` returns."""

    exit_code = EXIT_INTERNAL


class KernelCompileError(QmergeError):
    """A fused kernel could not be compiled under QMERGE_COMPILE_STRICT (exit 1): no silent eager fallback."""


class BadInputError(QmergeError):
    """Bad config or bad input file (exit 2). The message names the file and the problem."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, path: object | None = None, fix: str | None = None):
        parts = [f"{path}: {message}" if path is not None else message]
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__("\n  ".join(parts))
        self.path = path


class ConfigError(BadInputError):
    """Invalid pipeline config or text spec (exit 2)."""


class UnsupportedAdapterError(BadInputError):
    """An adapter whose math qmerge cannot reproduce exactly (exit 2)."""

"""qmerge: merge a QLoRA adapter into its base exactly, re-quantize, and gate the result."""

__version__ = "0.1.0"

"""calibrate: the tokenized calibration set for GPTQ (from a `calibration/` text spec), with the sha256
of its token ids. Refuses a calibration split that shares documents with the gate's eval split."""

from __future__ import annotations

from safetensors.torch import save_file

from qmerge.dag import StageContext
from qmerge.io.textset import build_windows, check_disjoint, load_text_spec


def run_calibrate(ctx: StageContext) -> dict:
    from transformers import AutoTokenizer

    q = ctx.cfg.quantize
    spec = load_text_spec(ctx.cfg.path(q.calibration, "quantize.calibration"))
    for other, what in ctx.cfg.eval_texts():
        check_disjoint(spec, load_text_spec(ctx.cfg.path(other, what)), "quantize.calibration", what)
    tokenizer = AutoTokenizer.from_pretrained(ctx.plan.tokenizer_folder())
    windows = build_windows(tokenizer, spec, q.seq_len, q.samples)
    save_file({"input_ids": windows.ids.contiguous()}, str(ctx.out / "calibration.safetensors"))
    return {**windows.describe(), "samples": q.samples, "seq_len": q.seq_len, "sha256": windows.sha256}

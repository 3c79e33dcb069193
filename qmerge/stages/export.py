"""export: the release formats that are conversions of an earlier stage's artifact, each written to its own folder
and scored by evaluate from those written bytes (read back by a reader that is not the writer).

- `gguf-<type>` (qmerge/io/gguf_writer.py): from the dense merge, quantized by the `gguf` package; the folder is
  an HF view of the file (config.json + tokenizer built from the GGUF by transformers) so evaluate streams it
  layer by layer from the GGUF itself. The tokenizer's metadata is made once and shared by every GGUF type
  (`GGUFVocab`): the first file's time includes it, the others' do not.
- `compressed-tensors` (qmerge/io/ct_checkpoint.py): the GPTQ result repacked, not re-quantized.
"""

from __future__ import annotations

import time

from qmerge.dag import StageContext
from qmerge.io.sources import artifact_bytes


def run_export(ctx: StageContext) -> dict:
    artifacts, vocab = {}, None
    for artifact in ctx.cfg.exports:
        out = ctx.out / artifact
        start = time.perf_counter()
        if artifact.startswith("gguf-"):
            from qmerge.io.gguf_reader import write_folder_view
            from qmerge.io.gguf_writer import gguf_vocab, write_gguf

            vocab = vocab or gguf_vocab(ctx.inputs["merge"])
            out.mkdir()
            report = write_gguf(ctx.inputs["merge"], out / "model.gguf", artifact[5:], quiet=ctx.quiet,
                                name=ctx.cfg.name, vocab=vocab)
            write_folder_view(out / "model.gguf", out)
        else:
            from qmerge.io.ct_checkpoint import write_compressed_tensors

            report = write_compressed_tensors(ctx.inputs["quantize"], out, quiet=ctx.quiet)
        artifacts[artifact] = {"seconds": round(time.perf_counter() - start, 3),
                               "bytes": artifact_bytes(out),
                               **{k: v for k, v in report.items() if k in ("qtype", "sha256", "tensor_types",
                                                                         "write_seconds", "quantize_seconds")}}
    return {"artifacts": artifacts}

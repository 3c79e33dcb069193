"""The final hidden states of a scored model on an eval text, kept in the work dir so that builds sharing a model
and a text (the dense and the GPTQ target of one adapter; every adapter's NF4 base with its adapters off) stream
that model through its layers once.

An entry is `<work_dir>/states/<key>/`: `states.safetensors` (one tensor per batch, the last decoder layer's
output before the final norm, in the dtype it was computed in) and `meta.json` (what the key hashes, readable).
The key hashes everything that decides those numbers: the model's identity (the sha256 of the base and adapter
files and the NF4 recipe for the reference and the base; a candidate's stage key and the sha256 of its stage's
done.json, which changes whenever the artifact is rebuilt), whether its adapters are on, the token ids of every
batch, the hardware that computes them (the GPU's name, capability and CUDA version, or the CPU's vector
capability and torch's thread count: results may differ in the last bits across them), and the versions of the
packages that compute or read them. Scoring from a loaded entry is the same arithmetic on the same tensors as
scoring right after the layers, so report.json is byte-identical either way (tests/stages/test_state_cache.py);
evaluate's done.json says which views were reused.

Entries are published whole (a temp dir renamed into place) and never half-written; two runs that compute the
same entry at once both finish and one publishes. `meta.json` holds the sha256 of the states file, checked on
every load: a damaged entry is recomputed and replaced, never trusted. A forced evaluate (`--force`, `--from`,
`--only`) reads no entry and replaces the ones it computes. A failed write (a full disk) costs the reuse, not the
evaluation: it is a warning. Temp dirs of killed runs are removed. Deleting `states/` only costs recomputation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from qmerge.io.atomic import TargetExistsError, atomic_dir, clean_stale_temps, write_json

log = logging.getLogger("qmerge")
FORMAT = "final-hidden-v2"  # what an entry holds; a new meaning is a new key (v2: each layer kind's own masks)
# Besides the stage keys' packages: the readers and writers of the artifacts a candidate is read back from.
READERS = ("gguf", "compressed-tensors", "safetensors", "numpy")
STATES, META = "states.safetensors", "meta.json"


def hardware(device: str) -> dict:
    """What, beyond the device's name, decides the last bits of a forward on it."""
    if str(device).startswith("cuda"):
        index = torch.device(device).index or 0
        return {"device": "cuda", "name": torch.cuda.get_device_name(index),
                "capability": list(torch.cuda.get_device_capability(index)), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()}
    return {"device": str(device), "cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def batches_digest(batches: list[torch.Tensor]) -> str:
    """The token ids of every batch, in order and split as scored."""
    h = hashlib.sha256()
    for batch in batches:
        ids = batch.detach().to("cpu", torch.int64).contiguous()
        h.update(json.dumps(list(ids.shape)).encode())
        h.update(ids.numpy().tobytes())
    return h.hexdigest()


class StateCache:
    """`<root>/<key>/` entries (module doc). `refresh`: read nothing, replace what is written."""

    def __init__(self, root: Path, refresh: bool = False):
        from qmerge.dag import KEYED_PACKAGES, package_versions

        self.root, self.refresh = Path(root), refresh
        self.versions = package_versions(KEYED_PACKAGES + READERS)
        self._bad: set[str] = set()  # entries found damaged: replaced when recomputed
        clean_stale_temps(self.root)  # what killed runs left

    def key(self, identity: dict, adapters_on: bool, batches_sha256: str, device: str) -> tuple[str, dict]:
        payload = {"format": FORMAT, "model": identity, "adapters_on": adapters_on, "batches": batches_sha256,
                   "hardware": hardware(device), "versions": self.versions}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24], payload

    def load(self, key: str, batches: list[torch.Tensor], device: str) -> list[torch.Tensor] | None:
        """The entry's states moved to `device`, or None (absent, refreshing, or not shaped like `batches`)."""
        from safetensors.torch import load

        path = self.root / key / STATES
        if self.refresh or not path.is_file():
            return None
        try:  # the bytes are read once: hashed, then parsed
            recorded = json.loads((path.parent / META).read_text())["sha256"]
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != recorded:
                raise ValueError(f"sha256 differs from meta.json's {recorded[:12]}…")
            tensors = load(data)
        except Exception as e:  # a damaged entry is recomputed, never trusted
            log.warning("ignoring unreadable hidden-state entry %s (%s: %s)", path, type(e).__name__, e)
            self._bad.add(key)
            return None
        states = [tensors.get(str(i)) for i in range(len(batches))]
        if len(tensors) != len(batches) or any(s is None or tuple(s.shape[:2]) != tuple(b.shape) for s, b in
                                               zip(states, batches)):
            log.warning("ignoring hidden-state entry %s: not shaped like this text's batches", path)
            self._bad.add(key)
            return None
        return [s.to(device) for s in states]

    def save(self, key: str, states: list[torch.Tensor], payload: dict) -> None:
        from safetensors.torch import save

        target = self.root / key
        replace = self.refresh or key in self._bad
        if target.exists() and not replace:
            return
        data = save({str(i): s.detach().to("cpu").contiguous() for i, s in enumerate(states)})
        try:
            with atomic_dir(target, replace=replace) as tmp:  # serialized once: written and hashed from memory
                (tmp / STATES).write_bytes(data)
                write_json(tmp / META, {**payload, "sha256": hashlib.sha256(data).hexdigest()})
        except TargetExistsError:
            pass  # another run published the same key meanwhile: equal keys, equal states
        except OSError as e:  # a full disk or a read-only work dir: the evaluation stands, the reuse is lost
            log.warning("could not keep hidden states under %s (%s: %s); later evaluations recompute them",
                        target, type(e).__name__, e)

"""quantize: GPTQ re-quantization of the merged checkpoint (Frantar et al. 2022, arXiv:2210.17323), written
in the standard GPTQ v1 format that transformers loads (see qmerge/io/gptq_checkpoint.py).

Backend "qmerge": layer by layer (qmerge/layerwise.py): the calibration windows' inputs to a decoder layer
are recorded, and inside the layer the linears are quantized true-sequentially: linears that read the same
input form a group (q/k/v, then o, then gate/up, then down); each group's Hessian is collected from a forward
through the layer as quantized so far, stopped as soon as that input exists. The quantized layer then
produces the next layer's inputs. Backend "gptqmodel": qmerge/gptqmodel_backend.py.

With `gptaq` (asymmetric calibration), the target is the unquantized model's output: every layer also runs,
unquantized, on the unquantized model's own inputs (a second stream of activations beside the quantized one),
and each group's solve gets ΔXXᵀ = 2(X̃ − X)Xᵀ/n beside H, so a layer also corrects the drift the quantized
layers before it left in its input.

With `compensate`, each linear also gets a rank-r correction of its GPTQ residual (W − Q as served, fitted in
its group's H; qmerge/ops/compensation.py), stored rounded to its dtype; the layer then runs with Q + B·A, as
served, so later groups and layers calibrate on what the release computes. The factors are written as a PEFT
LoRA adapter in `compensation/` (qmerge/io/compensation.py). With `compensate.train`, once a layer's linears are
quantized and fitted, its factors are trained so that the layer's output on the quantized model's inputs matches
the unquantized layer's output on the unquantized model's inputs (the stream GPTAQ keeps, kept for this too);
the closed-form fit is the start, and the layer's outputs for the next layer are computed after training.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from qmerge.dag import StageContext
from qmerge.errors import BadInputError, QmergeError
from qmerge.io.gptq_checkpoint import pack_linear, quantization_config, write_model_files
from qmerge.io.safetensors_io import CheckpointReader, ShardWriter
from qmerge.layerwise import (LOCKSTEP_BUDGET, LayerBatch, LayerwiseModel, LockstepForward, lockstep_bytes,
                              run_layer)
from qmerge.numerics import no_tf32
from qmerge.runtime import forward_dtype, pick_device, release_large_frees
from qmerge.ops import compensation, gptq
from qmerge.io import compensation as compensation_io
from qmerge.ops.gptq import check_group_size
from qmerge.io.atomic import write_json

TOKENS_PER_BATCH = 4096  # calibration windows per layer forward: bounded activations, enough work per matmul


class _StopForward(Exception):
    pass


def calibration_ids(ctx: StageContext) -> torch.Tensor:
    path = ctx.inputs["calibrate"] / "calibration.safetensors"
    ids = load_file(str(path))["input_ids"]
    q = ctx.cfg.quantize
    if ids.dim() != 2 or ids.numel() < q.samples * q.seq_len or ids.shape[1] < q.seq_len:
        raise BadInputError(f"calibration holds {ids.numel()} tokens as {list(ids.shape)}, fewer than quantize.samples "
                            f"× seq_len = {q.samples} × {q.seq_len}", path=path,
                            fix="lower quantize.samples or seq_len, or widen the calibration spec's documents")
    return ids[:q.samples, :q.seq_len]


def layer_linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in layer.named_modules() if type(m) is torch.nn.Linear}


def linear_groups(layer: torch.nn.Module, batch: LayerBatch) -> list[list[str]]:
    """Linears grouped by the tensor they read, in the order the layer calls them (one window's forward)."""
    order: list[tuple[str, torch.Tensor]] = []  # the tensors themselves: ids of freed tensors get reused
    handles = [m.register_forward_pre_hook(lambda _m, args, name=n: order.append((name, args[0])))
               for n, m in layer_linears(layer).items()]
    try:
        run_layer(layer, _windows(batch, 0, 1))
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in order:
        if any(name in g for _, g in groups):
            raise BadInputError(f"linear {name} is called more than once per layer forward (shared or MoE "
                                "experts); the qmerge backend does not support this architecture",
                                fix='use quantize.backend = "gptqmodel"')
        same = [g for t, g in groups if t is x]
        if same:
            same[0].append(name)
        else:
            groups.append((x, [name]))
    return [g for _, g in groups]


def _windows(batch: LayerBatch, start: int, stop: int) -> LayerBatch:
    """Windows [start, stop) of a batch: its hidden states and every per-window keyword argument (a tensor whose
    dim 0 is the batch's windows; tuples of them, as rotary embeddings come)."""
    n = batch.hidden.shape[0]

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n and n > 1:
            return v[start:stop]
        return tuple(cut(x) for x in v) if isinstance(v, tuple) else v
    return LayerBatch(batch.hidden[start:stop], {k: cut(v) for k, v in batch.kwargs.items()},
                      {kind: {k: cut(v) for k, v in kwargs.items()} for kind, kwargs in batch.by_kind.items()})


def input_of(layer: torch.nn.Module, module: torch.nn.Module, batch: LayerBatch,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """`module`'s input in the layer's forward on `batch`, the forward stopped right where it appears."""
    found = []

    def hook(_module, args):
        found.append(args[0])
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        run_layer(layer, batch, dtype)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return found[0]


TARGETS_BUDGET = LOCKSTEP_BUDGET  # GPTAQ: every group's X̃ of a layer is kept when it fits in this (float32 bytes)


class UnquantizedInputs:
    """GPTAQ's targets: each group's input X̃ in the unquantized model, by batch, and the layer's unquantized outputs
    (the next layer's unquantized inputs). Made before the layer is quantized: one forward through it as it is,
    which keeps every group's X̃ when they fit in TARGETS_BUDGET bytes; else an unquantized copy of the layer is kept
    and each X̃ is recomputed when asked for (a forward stopped at that group's input), so memory stays bounded
    by the layer, as with GPTQ's own re-runs."""

    def __init__(self, layer: torch.nn.Module, batches: list[LayerBatch], groups: list[list[str]],
                 dtype: torch.dtype | None = None):
        self.batches, self.dtype = batches, dtype
        linears = layer_linears(layer)
        tokens = sum(b.hidden.numel() // b.hidden.shape[-1] for b in batches)
        width = sum(linears[g[0]].in_features for g in groups)
        self.cache: list[list[torch.Tensor | None]] | None = None
        self.reference: torch.nn.Module | None = None
        if not groups:  # the outputs alone (compensation training without GPTAQ)
            handles = []
        elif tokens * width * 4 <= TARGETS_BUDGET:
            self.cache = [[] for _ in groups]
            handles = [linears[g[0]].register_forward_pre_hook(lambda _m, args, i=i: self.cache[i].append(args[0]))
                       for i, g in enumerate(groups)]
        else:
            self.reference, handles = copy.deepcopy(layer), []
            ref = layer_linears(self.reference)
            self.firsts = [ref[g[0]] for g in groups]
        try:
            self.outputs = [run_layer(layer, b, dtype) for b in batches]
        finally:
            for h in handles:
                h.remove()

    def get(self, group: int, batch: int) -> torch.Tensor:
        """X̃ of `group` for `batch`; each is asked for once (a cached one is then dropped)."""
        if self.cache is not None:
            x, self.cache[group][batch] = self.cache[group][batch], None
            return x
        return input_of(self.reference, self.firsts[group], self.batches[batch], self.dtype)


class GroupStatistics:
    """What a group's solve needs of its input X, batch by batch: H = 2XXᵀ/n, and with `targets` (GPTAQ) the cross
    term 2(X̃ − X)Xᵀ/n."""

    def __init__(self, first: torch.nn.Linear, group: int, targets: UnquantizedInputs | None = None):
        self.hessian = gptq.make_empty_hessian(first.in_features, device=first.weight.device)
        self.count = 0
        self.group, self.targets = group, targets
        self.cross = torch.zeros_like(self.hessian) if targets is not None else None

    def add(self, batch: int, x: torch.Tensor) -> None:
        if self.targets is not None:
            self.cross = gptq.accumulate_cross(x, self.targets.get(self.group, batch), self.cross, self.count)
        self.hessian, self.count = gptq.accumulate_hessian(x, self.hessian, self.count)


def group_hessian(layer: torch.nn.Module, first: torch.nn.Linear, batches: list[LayerBatch],
                  dtype: torch.dtype | None = None, group: int = 0,
                  targets: UnquantizedInputs | None = None) -> GroupStatistics:
    """The group's `GroupStatistics`, each batch's forward stopped right where its shared input X appears."""
    stats = GroupStatistics(first, group, targets)
    for index, batch in enumerate(batches):
        stats.add(index, input_of(layer, first, batch, dtype))
    return stats


class QuantizedLayer(NamedTuple):
    packed: dict  # packed tensors by module
    report: dict  # error report by module
    outputs: list[torch.Tensor]  # the layer's outputs for every batch, computed with the quantized weights
    unquantized_outputs: list[torch.Tensor] | None  # with `unquantized`: its outputs, computed unquantized
    training: dict | None = None  # with `compensate.train`: the layer's output error before and after training


def quantize_layer(layer: torch.nn.Module, batches: list[LayerBatch], q, name: str, lockstep: bool = False,
                   dtype: torch.dtype | None = None, factors: dict | None = None,
                   unquantized: list[LayerBatch] | None = None) -> QuantizedLayer:
    """GPTQ on every linear of `layer`, true-sequentially.

    `lockstep`: the batches advance through one forward, pausing at each group's input (`LockstepForward`),
    instead of re-running the layer from its start for each group and once more for the outputs. Same inputs,
    same bits; about 2.5× less forward work on a llama layer, for the activations the paused batches hold.
    `dtype`: the precision of the forwards' matmuls (`run_layer`); H, the solve and the weights stay float32.
    `factors`: with `q.compensate`, receives each linear's compensation (A, B) by module name.
    `unquantized`: with `q.gptaq` or `q.compensate.train`, the unquantized model's inputs to this layer, batch by
    batch (its outputs for them are the next layer's, and what compensation training aims at)."""
    linears = layer_linears(layer)
    groups = linear_groups(layer, batches[0])
    training = q.compensate.train if q.compensate is not None else None
    served: dict[str, torch.Tensor] | None = {} if training is not None else None
    # GPTAQ needs every group's X̃ from the unquantized run; training, its outputs alone
    run = (UnquantizedInputs(layer, unquantized, groups if q.gptaq is not None else [], dtype)
           if unquantized is not None else None)
    unquantized_out = run.outputs if run is not None else None
    targets = run if run is not None and q.gptaq is not None else None
    stats: list[GroupStatistics | None] = [None] * len(groups)  # each made when its group is reached

    inputs: list[list[torch.Tensor]] = [[] for _ in groups]  # each group's X, held by the paused batches anyway

    def accumulate(stop: int, batch: int, x: torch.Tensor) -> None:
        if stats[stop] is None:
            stats[stop] = GroupStatistics(linears[groups[stop][0]], stop, targets)
        stats[stop].add(batch, x)
        inputs[stop].append(x)

    passes = (LockstepForward(layer, batches, [linears[g[0]] for g in groups], accumulate, dtype) if lockstep
              else None)
    packed, report = {}, {}
    try:
        for index, group in enumerate(groups):
            if passes is not None:
                passes.advance()  # every batch paused at this group's input; its H is complete
                group_stats, stats[index] = stats[index], None
            else:
                group_stats = group_hessian(layer, linears[group[0]], batches, dtype, index, targets)
            _quantize_group(layer, linears, group, group_stats, q, name, packed, report, inputs[index], factors,
                            served)
            del group_stats
            inputs[index] = []
        trained = None
        if training is not None:  # the fit's outputs (for the report), training, then the trained layer's outputs
            if passes is not None:
                passes.advance()  # to the end: only what follows the last group's input runs again
                fitted = passes.outputs
                passes.close()  # its hooks must not pause the training's forwards
                passes = None
            else:
                fitted = [run_layer(layer, b, dtype) for b in batches]
            before = _mean_square_error(fitted, unquantized_out)
            del fitted
            trained = train_compensation(layer, linears, served, factors, name, batches, unquantized_out, training,
                                         getattr(torch, q.compensate.dtype))
        if passes is None:
            outputs = [run_layer(layer, b, dtype) for b in batches]
        else:
            passes.advance()  # to the end, through the quantized weights
            outputs = passes.outputs
        if trained is not None:
            trained |= {"mse_before": before, "mse_after": _mean_square_error(outputs, unquantized_out)}
        return QuantizedLayer(packed, report, outputs, unquantized_out, trained)
    finally:
        if passes is not None:
            passes.close()


def _quantize_group(layer, linears: dict, group: list[str], stats: GroupStatistics, q, name: str, packed: dict,
                    report: dict, inputs: list[torch.Tensor] | None = None, factors: dict | None = None,
                    served: dict | None = None) -> None:
    """GPTQ of the linears of one group (one shared input, hence one H), packed into `packed`, the layer's
    weights replaced by their quantized values so later groups see them. `inputs`: the group's input X batch by
    batch where the caller has it (the errors are then computed from X when that is cheaper). `served`: receives
    each compensated linear's weight as served (Q in fp16), which compensation training adds its B·A to."""
    hessian = stats.hessian
    try:  # once per group: the linears of a group read the same input, so they share H and its inverse
        inverse = gptq.inverse_hessian(hessian, q.damp, q.desc_act)
    except gptq.HessianNotPositiveDefinite as e:
        raise BadInputError(f"GPTQ of {name}.{'/'.join(group)}: {e}", path=q.calibration,
                            fix="raise quantize.damp, or check the merged weights and calibration for inf/NaN")
    asymmetry, cross = None, stats.cross
    stats.cross = None
    if cross is not None:
        asymmetry = gptq.asymmetric_update(cross, inverse, q.gptaq.alpha)
        if q.compensate is None:  # else the compensation's target needs it
            cross = None
    if q.compensate is None and not gptq.errors_need_hessian(inputs, hessian.shape[0]):
        stats.hessian = hessian = None  # nothing after the inverse reads H: free it (485 MB for a 7B down_proj)
    weights = [linears[m].weight.detach() for m in group]
    results = gptq.quantize_weights(weights, hessian, q.bits, q.group_size, q.sym, q.desc_act, q.damp,
                                    inverse=inverse, search=q.scale_search, asymmetry=asymmetry,
                                    static_groups=q.static_groups)
    damp = inverse.damp  # the damping GPTQ's Cholesky needed (it retries larger ones)
    del asymmetry, inverse  # as large as H
    # a Hessian GPTQ took is one the fit takes
    lower = _hessian_root(hessian, damp, q, name, group) if q.compensate is not None else None
    for module_name, w, result in zip(group, weights, results):
        linear = linears[module_name]
        codes = gptq.codes_from_weight(result.weight, result.scales, result.zeros, result.g_idx, q.bits)
        packed[module_name] = pack_linear(codes.cpu(), result.scales.cpu(), result.zeros.cpu(),
                                          result.g_idx.cpu(), q.bits)
        del codes
        # the layer computes on from what the kernels serve (fp16 products, fp16 bias), as the release will: the
        # next layer's inputs, Hessians and GPTAQ statistics come from those outputs
        weight = as_served = _as_served(result.weight)
        if lower is not None:
            # with GPTAQ the compensation fits the same target as the solve (W's output on the unquantized inputs),
            # not W itself, which would undo the correction GPTAQ made
            target = w if cross is None else compensation.asymmetric_target(w, cross, lower, q.gptaq.alpha)
            a, b = _compensate(target, as_served, lower, q.compensate)
            weight = _with_factors(as_served, a, b)
            factors[f"{name}.{module_name}"] = (a.cpu(), b.cpu())
            if served is not None:
                served[module_name] = as_served
        rtn = gptq.round_to_nearest(w, q.bits, q.group_size, q.sym, q.scale_search).weight
        report[module_name] = _errors(w, result.weight, rtn, hessian, inputs, weight if lower is not None else None)
        del rtn
        with torch.no_grad():
            linear.weight.copy_(weight)
            if linear.bias is not None:
                linear.bias.copy_(linear.bias.to(torch.float16))


def _hessian_root(hessian: torch.Tensor, damp: float, q, name: str, group: list[str]) -> torch.Tensor:
    try:
        return compensation.hessian_root(hessian, damp)
    except ValueError as e:
        raise BadInputError(f"compensation of {name}.{'/'.join(group)}: {e}", path=q.calibration,
                            fix="raise quantize.damp, or check the merged weights and calibration for inf/NaN")


def _as_served(quantized: torch.Tensor) -> torch.Tensor:
    """A GPTQ weight as the kernels compute it (the fp16 product), in its own dtype."""
    return quantized.to(torch.float16).to(quantized.dtype)


def _with_factors(served: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Q_served + B·A in Q's dtype: what a compensated linear computes."""
    return served + b.to(served.dtype) @ a.to(served.dtype)


def _compensate(w: torch.Tensor, served: torch.Tensor, lower: torch.Tensor,
                settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B): the correction of W − Q_served (W: the weight the fit aims at), rounded to their stored dtype."""
    a, b = compensation.fit(w.to(served.dtype) - served, lower, settings.rank)
    dtype = getattr(torch, settings.dtype)
    return a.to(dtype), b.to(dtype)


def train_compensation(layer: torch.nn.Module, linears: dict, served: dict[str, torch.Tensor], factors: dict,
                       name: str, batches: list[LayerBatch], targets: list[torch.Tensor], t,
                       store: torch.dtype) -> dict:
    """Trains the layer's compensation factors (`factors[f"{name}.{module}"]`, replaced by the trained ones, rounded
    to `store`) so that the layer, each linear computing Q·x + B·(A·x) with Q = `served[module]`, maps each batch's
    inputs to `targets` (the unquantized layer's outputs on the unquantized inputs): Adam on the mean squared error,
    `t.windows` calibration windows per step, the steps of an epoch in a seeded order, float32. Afterwards each
    linear holds Q + B·A (as after the closed-form fit) and the layer's parameters are as they were, frozen or not.
    Returns {"steps": optimizer steps taken}."""
    modules = list(served)
    trainable = {}
    for module in modules:
        a, b = factors[f"{name}.{module}"]
        trainable[module] = (a.float().clone().requires_grad_(True), b.float().clone().requires_grad_(True))
    grad_flags = {p: p.requires_grad for p in layer.parameters()}
    steps = [(i, start) for i, batch in enumerate(batches) for start in range(0, batch.hidden.shape[0], t.windows)]

    def error(i: int, start: int) -> torch.Tensor:
        batch = _windows(batches[i], start, start + t.windows)
        out = layer(batch.hidden, **batch.kwargs_for(layer))
        out = out[0] if isinstance(out, tuple) else out
        return (out.float() - targets[i][start:start + t.windows].float()).square().mean()

    hooks = []
    try:
        for p in grad_flags:
            p.requires_grad_(False)
        with torch.no_grad():
            for module in modules:
                linears[module].weight.copy_(served[module])
        for module in modules:
            a, b = trainable[module]
            hooks.append(linears[module].register_forward_hook(
                lambda _m, args, out, a=a, b=b: out + (args[0].to(a.dtype) @ a.T @ b.T).to(out.dtype)))
        optimizer = torch.optim.Adam([x for ab in trainable.values() for x in ab], lr=t.lr)
        order = torch.Generator().manual_seed(t.seed)
        for _ in range(t.epochs):
            for k in torch.randperm(len(steps), generator=order).tolist():
                optimizer.zero_grad(set_to_none=True)
                error(*steps[k]).backward()
                optimizer.step()
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for module in modules:
                a, b = (x.detach().to(store) for x in trainable[module])
                factors[f"{name}.{module}"] = (a.cpu(), b.cpu())
                linears[module].weight.copy_(_with_factors(served[module], a, b))
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
    return {"steps": t.epochs * len(steps)}


def _mean_square_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean over every entry of every batch of (output − target)², accumulated in float64."""
    total = sum(float((o.double() - t.double()).square().sum()) for o, t in zip(outputs, targets))
    return total / sum(t.numel() for t in targets)


def _errors(w: torch.Tensor, q: torch.Tensor, rtn: torch.Tensor, hessian: torch.Tensor | None,
            inputs: list[torch.Tensor] | None = None, compensated: torch.Tensor | None = None) -> dict:
    """‖(W − Q)X‖ per token (RMS over calibration tokens) and relative to ‖WX‖, for GPTQ and round-to-nearest,
    and for Q + B·A when `compensated` is given; the deltas are made one at a time (`_deltas`)."""
    ref, *errs = gptq.output_errors(_deltas(w, q, rtn, compensated), hessian, inputs)
    out = {}
    for key, err in zip(("", "rtn_", "compensated_"), errs):
        out |= {f"{key}error": err**0.5, f"{key}relative": (err / ref) ** 0.5 if ref else None}
    return out


def _deltas(w: torch.Tensor, q: torch.Tensor, rtn: torch.Tensor, compensated: torch.Tensor | None):
    """W, then W − Q for each Q, made one at a time (each a weight-sized temporary)."""
    yield w
    yield w - q
    yield w - rtn
    if compensated is not None:
        yield w.to(compensated.dtype) - compensated


def run_qmerge_backend(merged: Path, out: Path, ids: torch.Tensor, q, device: str, quiet: bool,
                       max_shard_size: int, expected: set[str]) -> dict:
    """GPTQ of every linear, layer by layer. `expected`: the modules the plan says bitsandbytes quantized; a
    GPTQ checkpoint in which one of them was not packed would be mislabelled, so that is an error."""
    runner = LayerwiseModel.from_folder(merged, device)
    reader = runner.source  # a dense merged checkpoint (CheckpointReader)
    names = [f"{runner.layer_prefix(i)}.{n}.weight" for i in range(len(runner.layers))
             for n in layer_linears(runner.layers[i])]
    check_group_size({n: reader.tensors[n].shape for n in names}, names, q.group_size, q.bits, merged)
    batch_size = max(1, TOKENS_PER_BATCH // ids.shape[1])
    batches = runner.layer_inputs(ids, batch_size)
    # the unquantized model's stream (same embeddings): GPTAQ's targets, and what compensation training aims at
    trains = q.compensate is not None and q.compensate.train is not None
    unquantized = list(batches) if q.gptaq is not None or trains else None
    widths = [d for n in names for d in reader.tensors[n].shape]
    hidden = batches[0].hidden.shape[-1]
    lockstep = lockstep_bytes(ids.numel(), hidden, max(widths)) <= LOCKSTEP_BUDGET
    if lockstep:
        release_large_frees()
    dtype = None if q.forward_dtype == "float32" else getattr(torch, q.forward_dtype)
    layers_report, factors, training = {}, ({} if q.compensate is not None else None), {}
    with ShardWriter(out, max_shard_bytes=max_shard_size) as writer:
        for name in reader.tensors:  # embeddings, final norm, lm_head: as merged, no second cast
            if not name.startswith(f"{runner.layers_prefix}."):
                writer.add(name, reader.get(name))
        for index in tqdm(range(len(runner.layers)), desc="quantize (gptq)", disable=quiet, unit="layer"):
            prefix = runner.layer_prefix(index)
            layer = runner.load_layer(index)
            packed, report, outputs, unquantized_outputs, trained = quantize_layer(layer, batches, q, prefix, lockstep,
                                                                                   dtype, factors, unquantized)
            if trained is not None:
                training[prefix] = trained
            missing = sorted(m for m in expected if m.startswith(f"{prefix}.") and m[len(prefix) + 1:] not in packed)
            if missing:
                raise QmergeError(f"GPTQ left {missing} unpacked although they are quantized linears; refusing to "
                                  "write a GPTQ checkpoint that holds them dense")
            _write_layer(writer, reader, prefix, packed)
            batches = [b.with_hidden(out) for out, b in zip(outputs, batches)]
            if unquantized is not None:
                unquantized = [b.with_hidden(out) for out, b in zip(unquantized_outputs, unquantized)]
            del outputs, unquantized_outputs
            runner.free_layer(index)
            layers_report[prefix] = report
    if factors is not None:
        compensation_io.write_adapter(out / compensation_io.FOLDER, factors, q.compensate.rank)
    return layers_report, training


def _write_layer(writer: ShardWriter, reader: CheckpointReader, prefix: str, packed: dict) -> None:
    for name in reader.tensors:
        if not name.startswith(f"{prefix}."):
            continue
        module = name[len(prefix) + 1:].rpartition(".")[0]
        if module in packed and name.endswith(".weight"):
            for suffix, tensor in packed[module].items():
                writer.add(f"{prefix}.{module}.{suffix}", tensor)
        else:
            writer.add(name, reader.get(name))


def quantize_device() -> str:
    return pick_device()  # the rule the stage key's forward_dtype is resolved by (pipeline._quantize_slice)


def run_quantize(ctx: StageContext) -> dict:
    q = ctx.cfg.quantize
    merged = ctx.inputs["merge"]
    ids = calibration_ids(ctx)
    qconfig = quantization_config(q.bits, q.group_size, q.sym, q.desc_act, q.damp, q.static_groups)
    if q.backend == "gptqmodel":
        from qmerge.gptqmodel_backend import run_gptqmodel

        report = {"backend": "gptqmodel", **run_gptqmodel(merged, ctx.out, ids, q)}
    else:
        device = quantize_device()
        q = q.model_copy(update={"forward_dtype": forward_dtype(q.forward_dtype, device)})  # as in the stage key
        with no_tf32():
            layers, training = run_qmerge_backend(merged, ctx.out, ids, q, device, ctx.quiet,
                                                  ctx.cfg.merge.max_shard_size, set(ctx.plan.quantized_modules))
        write_model_files(merged, ctx.out, qconfig)
        report = {"backend": "qmerge", "device": device, "forward_dtype": q.forward_dtype, "layers": layers,
                  **_summary(layers), **_training_summary(training)}
    report |= {"quantization_config": qconfig,
               "calibration": {"samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])}}
    write_json(ctx.out / "quantize_report.json", report)
    return {k: v for k, v in report.items() if k != "layers"}


def _training_summary(training: dict) -> dict:
    """Compensation training's output error per layer, before and after (the linears' `compensated_*` errors are the
    closed-form fit's, before training)."""
    return {"compensation_training": training} if training else {}


def _summary(layers: dict) -> dict:
    rel = [m["relative"] for r in layers.values() for m in r.values() if m["relative"] is not None]
    rtn = [m["rtn_relative"] for r in layers.values() for m in r.values() if m["rtn_relative"] is not None]
    comp = [m["compensated_relative"] for r in layers.values() for m in r.values()
            if m.get("compensated_relative") is not None]
    return {"linears": len(rel), "mean_relative_error": sum(rel) / len(rel) if rel else None,
            "mean_rtn_relative_error": sum(rtn) / len(rtn) if rtn else None,
            **({"mean_compensated_relative_error": sum(comp) / len(comp)} if comp else {})}

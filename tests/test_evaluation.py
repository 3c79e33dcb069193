"""Layer-streamed evaluation equals whole-model evaluation, for every adapter variant, and streams.

The twin: `qmerge.models` builds the reference (NF4 base as trained + PEFT applying the adapters unmerged) and the
candidates as whole float32 models; `StreamedLogits` runs the same models one decoder layer at a time. Both feed
the same `score`/`summarize`, and every figure of the report (ppl, nll, KL statistics, ppl ratio, retention, each
with its standard error) must agree within 1e-6 relative. The candidates are real merges written by the pipeline;
that they differ from the base (so the comparison is not trivially equal) is asserted too.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests.conftest import make_adapter, make_base, run_cli, write_config
from tests.stages.test_merge_exact import finished

REL = 1e-6


def _leaves(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def assert_same_report(streamed: dict, whole: dict) -> None:
    a, b = dict(_leaves(streamed)), dict(_leaves(whole))
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        if isinstance(x, float) and isinstance(y, float):
            if math.isnan(x) or math.isnan(y):
                assert math.isnan(x) and math.isnan(y), key
            else:
                assert abs(x - y) <= REL * max(abs(x), abs(y), 1e-3), f"{key}: streamed {x!r} vs whole {y!r}"
        else:
            assert x == y, f"{key}: streamed {x!r} vs whole {y!r}"


def both_reports(base: Path, adapters: list[tuple[Path, float]], candidates: dict[str, Path], ids: torch.Tensor,
                 batch_size: int = 2, nf4: tuple = (64, True, None, "float32", None)):
    """(streamed section, whole-model section, the layer-wise models) for the same windows."""
    from qmerge.evaluation import (StreamedLogits, View, _forward, peft_forwards, score, summarize,
                                   whole_model_logits)
    from qmerge.io.base import BaseCheckpoint, NF4Recipe
    from qmerge.layerwise import LayerwiseModel
    from qmerge.models import checkpoint_model, load_dequantized, reference_model, streamed_base

    checkpoint = BaseCheckpoint(base, NF4Recipe(*nf4))
    batches = list(torch.split(ids, batch_size))
    names = ("base", *candidates)

    ref_fwd, base_fwd = peft_forwards(reference_model(checkpoint, adapters))
    forwards = {"reference": ref_fwd, "base": base_fwd}
    for name, path in candidates.items():
        forwards[name] = _forward(load_dequantized(path) if name == "quantized" else checkpoint_model(path))
    whole = asdict(summarize(score(batches, whole_model_logits(forwards, batches), names, tuple(candidates)),
                             tuple(candidates)))

    reference = streamed_base(checkpoint, adapters)
    views = {"reference": View(reference), "base": View(reference, adapters=False)}
    views |= {name: View(LayerwiseModel.from_folder(path)) for name, path in candidates.items()}
    logits = StreamedLogits(views, batches, quiet=True)
    streamed = asdict(summarize(score(batches, logits, names, tuple(candidates)), tuple(candidates)))
    logits.close()
    return streamed, whole, {v.model for v in views.values()}


def merged_candidate(tmp_path: Path, base: Path, adapters: list[tuple[Path, float]], dtype: str = "float32") -> Path:
    cfg = write_config(tmp_path, base, adapters, merge={"dtype": dtype})
    assert run_cli(cfg) == 0
    return finished(tmp_path / "work", "merge")


def check(tmp_path, base, adapters, tokens, dtype="float32"):
    merged = merged_candidate(tmp_path, base, adapters, dtype)
    streamed, whole, models = both_reports(base, adapters, {"merged": merged}, tokens)
    assert_same_report(streamed, whole)
    # Not trivially equal: the adapter moves the reference away from the base.
    assert streamed["ppl"]["reference"]["value"] != streamed["ppl"]["base"]["value"]
    # The streaming bound: never more than one decoder layer of any model real at once (each has 2).
    assert all(m.max_layers_alive == 1 and len(m.layers) == 2 for m in models)
    return streamed


def test_plain_lora_two_dtypes(tmp_path, tiny_llama, tokens):
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    kls = {}
    for dtype in ("float32", "bfloat16"):
        (tmp_path / dtype).mkdir()
        section = check(tmp_path / dtype, tiny_llama, [(adapter, 1.0)], tokens, dtype)
        kls[dtype] = section["candidates"]["merged"]["kl"]["mean"]["value"]
    # bf16 storage is a different model, and KL says so; float32's KL is the float32 log-softmax noise floor
    # (measured 5e-8 against 1.8e-6 for bf16).
    assert kls["float32"] < 2e-7 and kls["bfloat16"] > 10 * kls["float32"]


def test_gpt2_conv1d(tmp_path, tokens):
    base = make_base(tmp_path / "gpt2", arch="gpt2", dtype="float32")
    adapter = make_adapter(base, tmp_path / "a", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    check(tmp_path, base, [(adapter, 1.0)], tokens)


@pytest.mark.parametrize("variant", ["embedding_tied", "lm_head_tied", "modules_to_save", "dora", "rslora_pattern"])
def test_adapter_variants(tmp_path, tiny_llama, tokens, variant):
    kwargs = {"embedding_tied": {"target_modules": ["embed_tokens", "q_proj"]},
              "lm_head_tied": {"target_modules": ["lm_head", "q_proj"]},
              "modules_to_save": {"modules_to_save": ["lm_head"]},
              "dora": {"use_dora": True},
              "rslora_pattern": {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 32}},
              }[variant]
    adapter = make_adapter(tiny_llama, tmp_path / "a", **kwargs)
    check(tmp_path, tiny_llama, [(adapter, 1.0)], tokens)


def test_bias_all_and_lora_bias(tmp_path, tokens):
    base = make_base(tmp_path / "b", bias=True, dtype="float32")
    a1 = make_adapter(base, tmp_path / "a1", bias="all")
    a2 = make_adapter(base, tmp_path / "a2", lora_bias=True, target_modules=["k_proj", "o_proj"], seed=3)
    for adapter in (a1, a2):
        sub = tmp_path / f"run-{adapter.name}"
        sub.mkdir()
        check(sub, base, [(adapter, 1.0)], tokens)


def test_two_weighted_adapters(tmp_path, tiny_llama, tokens):
    a1 = make_adapter(tiny_llama, tmp_path / "a1", seed=1)
    a2 = make_adapter(tiny_llama, tmp_path / "a2", seed=2, target_modules=["q_proj", "o_proj", "up_proj"])
    check(tmp_path, tiny_llama, [(a1, 0.7), (a2, -0.5)], tokens)


def test_a_wrong_candidate_is_seen_by_the_streamed_path(tmp_path, tiny_llama, tokens):
    """Two-sided: the streamed KL of a candidate that dropped the delta (the base itself, written as a checkpoint)
    is large, and equals the whole-model figure."""
    from qmerge.io.base import BaseCheckpoint, NF4Recipe
    from qmerge.models import base_model_as_trained

    adapter = make_adapter(tiny_llama, tmp_path / "a")
    plain = tmp_path / "plain"
    base_model_as_trained(BaseCheckpoint(tiny_llama, NF4Recipe(64, True, None, "float32", None))).save_pretrained(plain)
    streamed, whole, _ = both_reports(tiny_llama, [(adapter, 1.0)], {"merged": plain}, tokens)
    assert_same_report(streamed, whole)
    assert streamed["candidates"]["merged"]["kl"]["mean"]["value"] > 1e-3
    assert abs(streamed["ppl"]["merged"]["value"] - streamed["ppl"]["base"]["value"]) < 1e-4


@pytest.mark.gpu
def test_streamed_evaluation_on_cuda_matches_cpu(tmp_path, tiny_llama, tokens):
    """Layers on the GPU (float32, TF32 off) give the CPU figures within float32 reduction-order noise."""
    from qmerge.evaluation import StreamedLogits, View, score, summarize
    from qmerge.io.base import BaseCheckpoint, NF4Recipe
    from qmerge.layerwise import LayerwiseModel
    from qmerge.models import streamed_base
    from qmerge.numerics import no_tf32

    adapter = make_adapter(tiny_llama, tmp_path / "a")
    merged = merged_candidate(tmp_path, tiny_llama, [(adapter, 1.0)])
    checkpoint = BaseCheckpoint(tiny_llama, NF4Recipe(64, True, None, "float32", None))
    batches = list(torch.split(tokens, 2))
    sections = {}
    for device in ("cpu", "cuda"):
        reference = streamed_base(checkpoint, [(adapter, 1.0)], device)
        views = {"reference": View(reference), "base": View(reference, adapters=False),
                 "merged": View(LayerwiseModel.from_folder(merged, device))}
        with no_tf32():
            logits = StreamedLogits(views, batches, quiet=True)
            sections[device] = summarize(score(batches, logits, ("base", "merged"), ("merged",)), ("merged",))
    for name in ("reference", "base", "merged"):
        assert sections["cuda"]["ppl"][name]["value"] == pytest.approx(sections["cpu"]["ppl"][name]["value"], rel=1e-4)


@pytest.mark.parametrize("variant", ["plain", "bias_all", "modules_to_save", "dora", "embedding_tied"])
def test_weight_retention_fed_by_the_streamed_pass_equals_its_whole_twin(tmp_path, tokens, variant):
    """Evaluate takes each layer's W_nf4 from the reference layer it already holds instead of re-deriving it:
    the report must be exactly what the separate pass (`finish` alone) gives, and must see a lossy candidate."""
    from qmerge.evaluation import StreamedLogits, View
    from qmerge.layerwise import LayerwiseModel
    from qmerge.models import streamed_base
    from qmerge.plan import Plan
    from qmerge.stages.evaluate import WeightRetention

    base = make_base(tmp_path / "b", bias=variant == "bias_all", dtype="float32")
    kwargs = {"plain": {}, "bias_all": {"bias": "all"}, "modules_to_save": {"modules_to_save": ["lm_head"]},
              "dora": {"use_dora": True}, "embedding_tied": {"target_modules": ["embed_tokens", "q_proj"]}}[variant]
    adapter = make_adapter(base, tmp_path / "a", b_std=1e-3, **kwargs)
    merged = merged_candidate(tmp_path, base, [(adapter, 1.0)], dtype="bfloat16")  # bf16: retention below 1
    (resolve_dir,) = [d for d in (tmp_path / "work" / "resolve").iterdir() if d.is_dir()]
    plan = Plan.from_json(__import__("json").loads((resolve_dir / "done.json").read_text())["result"])
    fed = WeightRetention(plan, {"merged": merged})
    reference = streamed_base(fed.inputs.base, plan.adapter_weights)
    views = {"reference": View(reference), "merged": View(LayerwiseModel.from_folder(merged))}
    StreamedLogits(views, list(torch.split(tokens, 2)), quiet=True,
                   on_layer=lambda m, i, layer: fed.add_layer(m, i, layer) if m is reference else None).close()
    assert any(t.startswith("model.layers.") for t in fed.seen)
    got, want = fed.finish(), WeightRetention(plan, {"merged": merged}).finish()
    assert got == want
    assert want["merged"]["layers"] and abs(want["merged"]["aggregate"] - 1) > 1e-6  # bf16 rounding is seen


def test_score_takes_each_log_softmax_once_and_gives_the_textbook_bits():
    """`score` shares one log-softmax per model and batch among NLL, KL, agreement and p(correct): every figure
    equals, bit for bit, its direct formula (metrics.token_nll; Σ p_ref·(log p_ref − log p_cand)) taken on the
    positions that have a next token, also when its buffers are reused from batch to batch and when a smaller last
    batch makes new ones."""
    from qmerge.evaluation import score
    from qmerge.ops.metrics import token_nll

    torch.manual_seed(0)
    vocab = 512
    batches = [torch.randint(0, vocab, (n, 17)) for n in (3, 3, 2)]
    table = {name: [torch.randn(3, 17, vocab) * s for _ in batches]
             for name, s in (("reference", 2.0), ("base", 2.1), ("quantized", 2.4))}
    table["merged"] = [r + 1e-4 * torch.randn_like(r) for r in table["reference"]]
    got = score(batches, lambda name, i: table[name][i], ("base", "merged", "quantized"), ("merged", "quantized"))
    for i, batch in enumerate(batches):
        targets = batch[:, 1:].unsqueeze(-1)
        ref_logp = torch.log_softmax(table["reference"][i][:, :-1].float(), dim=-1)
        assert torch.equal(got.p_ref[i], ref_logp.gather(-1, targets).squeeze(-1).exp())
        for name in ("reference", "base", "merged", "quantized"):
            assert torch.equal(got.nll[name][i], token_nll(table[name][i], batch).mean(dim=1))
        for name in ("merged", "quantized"):
            logp = torch.log_softmax(table[name][i][:, :-1].float(), dim=-1)
            assert torch.equal(got.kl[name][i], (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0))
            assert torch.equal(got.agree[name][i], (logp.argmax(-1) == ref_logp.argmax(-1)).float())
            assert torch.equal(got.p_cand[name][i], logp.gather(-1, targets).squeeze(-1).exp())
    assert "base" not in got.kl


def test_weight_retention_does_not_depend_on_the_order_tensors_come_in(tmp_path):
    """The streamed pass feeds tensors layer by layer, cached states in checkpoint-name order (layers.10 before
    layers.2): the report must be the same bytes either way, so the sums run in one fixed order."""
    from qmerge.plan import Plan
    from qmerge.stages.evaluate import WeightRetention

    base = make_base(tmp_path / "b", dtype="float32")
    adapter = make_adapter(base, tmp_path / "a", b_std=1e-3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj"])
    merged = merged_candidate(tmp_path, base, [(adapter, 1.0)], dtype="bfloat16")
    (resolve_dir,) = [d for d in (tmp_path / "work" / "resolve").iterdir() if d.is_dir()]
    plan = Plan.from_json(__import__("json").loads((resolve_dir / "done.json").read_text())["result"])
    forward, backward = WeightRetention(plan, {"merged": merged}), WeightRetention(plan, {"merged": merged})
    for tensor in forward.names:
        forward.add(tensor)
    for tensor in reversed(backward.names):
        backward.add(tensor)
    got, want = backward.finish(), forward.finish()
    import json

    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    assert len(want["merged"]["layers"]) == 14 and abs(want["merged"]["aggregate"] - 1) > 1e-6


def _layerwise_vs_transformers(folder: Path, ids: torch.Tensor) -> tuple[float, float]:
    """max |Δ| between the layer runner's logits and transformers' own forward of the same checkpoint."""
    from transformers import AutoModelForCausalLM

    from qmerge.layerwise import LayerwiseModel, run_layer

    runner = LayerwiseModel.from_folder(folder)
    runner.logit_steps  # noqa: B018 - what StreamedLogits checks first
    states = runner.layer_inputs_of([ids])
    for i in range(len(runner.layers)):
        layer = runner.load_layer(i)
        states = [b.with_hidden(run_layer(layer, b)) for b in states]
        runner.free_layer(i)
    runner.load_head()
    got = runner.logits(states[0].hidden)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(input_ids=ids).logits.float()
    return float((got - want).abs().max()), float(want.abs().max())


def _random_checkpoint(folder: Path, config) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms and biases away from their 1 / 0 initialisation
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.dim() == 1 and "norm" in name else 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


_SHAPES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)


@pytest.mark.parametrize("kind", ["granite", "cohere", "olmo", "bloom", "biogpt"])
def test_the_layer_runner_rebuilds_what_a_model_does_around_its_layers(tmp_path, kind):
    """Granite divides its head's output by `logits_scaling`, Cohere multiplies it by `logit_scale`; OLMo's final
    LayerNorm has no parameters; Bloom normalises its embeddings before the first layer. Each is transformers'
    forward exactly (before: logits off by up to 8, or a crash on a weight left on the meta device). BioGPT's head is
    `output_projection`, not `lm_head`."""
    import transformers

    config = {"granite": lambda: transformers.GraniteConfig(**_SHAPES, logits_scaling=4.0, embedding_multiplier=3.0),
              "cohere": lambda: transformers.CohereConfig(**_SHAPES, logit_scale=0.25),
              "olmo": lambda: transformers.OlmoConfig(**_SHAPES),
              "bloom": lambda: transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4),
              "biogpt": lambda: transformers.BioGptConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=96)}[kind]()
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, 16))
    diff, scale = _layerwise_vs_transformers(_random_checkpoint(tmp_path / kind, config), ids)
    assert scale > 1 and diff <= 1e-5 * scale


def test_a_head_the_runner_cannot_rebuild_is_refused():
    """A forward that changes its logits in a way the runner does not know is exit 2, not a silent mismatch."""
    from qmerge.errors import BadInputError
    from qmerge.layerwise import logit_steps

    class Cut:
        def forward(self, hidden_states, slice_indices):
            logits = self.lm_head(hidden_states[:, slice_indices, :])
            logits = logits[..., :100]
            return logits

    class Scaled:
        def forward(self, hidden_states, slice_indices):
            logits = self.lm_head(hidden_states[:, slice_indices, :])
            logits = logits / self.config.logits_scaling  # the Granite line
            return dict(logits=logits)

    with pytest.raises(BadInputError, match=r"logits\[\.\.\., :100\]") as e:
        logit_steps(Cut, None)
    assert e.value.exit_code == 2

    class Config:
        logits_scaling = 8

        def get_text_config(self):
            return self

    assert logit_steps(Scaled, Config()) == [("div", 8.0)]

    import transformers  # a head line that also scales (Falcon-H1)

    config = transformers.FalconH1Config(lm_head_multiplier=0.5)
    assert logit_steps(transformers.FalconH1ForCausalLM, config) == [("mul", 0.5)]

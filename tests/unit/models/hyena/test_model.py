"""StripedHyena 2 model: layouts, flavors, FLOPs, blocks against hand computations, init, precision."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.common.norm import RMSNorm
from torchtitan_hyena.models.common.precision import cast_model_, fp32_modules
from torchtitan_hyena.models.hyena import hyena_flavors
from torchtitan_hyena.models.hyena.args import HyenaArgs, parse_layout
from torchtitan_hyena.models.hyena.model import StripedHyena
from torchtitan_hyena.models.hyena.operators import Attention
from torchtitan_hyena.models.hyena.parallelize import check_tp_divisibility


def tiny_args(**kw) -> HyenaArgs:
    base = dict(dim=32, layout="SDH*", n_heads=2, ffn_hidden_dim=48, filter_groups=4, vocab_size=64, conv_impl="torch")
    return HyenaArgs(**(base | kw))


def tiny_model(**kw) -> StripedHyena:
    model = StripedHyena(tiny_args(**kw))
    model.init_weights(seed=0)
    return model


def test_hyena_registered_with_evo2_flavors():
    from torchtitan_hyena.protocols.train_spec import get_train_spec

    spec = get_train_spec("hyena")
    assert spec.model_cls is StripedHyena
    want = {"debugmodel", "evo2_1b", "evo2_7b", "evo2_7b_1m", "evo2_20b", "evo2_40b", "evo2_40b_1m"}
    assert want | {"neural_pile_hybrid_8b"} <= set(spec.model_args)
    assert set(hyena_flavors["debugmodel"].layout) == set("SDH*")


def test_layout_strings_and_index_lists():
    assert parse_layout("SDH*SDH*") == "SDH*SDH*"
    assert parse_layout("S:0,4; D:1,5; H:2,6; *:3,7") == "SDH*SDH*"
    for bad, fragment in [("SDX", "only the letters"), ("S:0;D:2", "without a type"), ("S:0;D:0", "listed twice")]:
        with pytest.raises(ConfigError, match=fragment):
            parse_layout(bad)


# docs/stripedhyena2.md §1: the YAML index lists of every Evo 2 size.
EVO2_INDICES = {
    "evo2_1b": ([3, 10, 17, 24], [0, 4, 7, 11, 14, 18, 21], [1, 5, 8, 12, 15, 19, 22], [2, 6, 9, 13, 16, 20, 23]),
    "evo2_7b": (
        [3, 10, 17, 24, 31],
        [0, 4, 7, 11, 14, 18, 21, 25, 28],
        [1, 5, 8, 12, 15, 19, 22, 26, 29],
        [2, 6, 9, 13, 16, 20, 23, 27, 30],
    ),
    "evo2_20b": ([3, 10, 17], [0, 4, 7, 11, 14, 18, 21], [1, 5, 8, 12, 15, 19, 22], [2, 6, 9, 13, 16, 20, 23]),
    "evo2_40b": (
        [3, 10, 17, 24, 31, 35, 42, 49],
        [0, 4, 7, 11, 14, 18, 21, 25, 28, 32, 36, 39, 43, 46],
        [1, 5, 8, 12, 15, 19, 22, 26, 29, 33, 37, 40, 44, 47],
        [2, 6, 9, 13, 16, 20, 23, 27, 30, 34, 38, 41, 45, 48],
    ),
}


@pytest.mark.parametrize("flavor", sorted(EVO2_INDICES))
def test_evo2_layouts_match_published_index_lists(flavor):
    attn, se, mr, li = EVO2_INDICES[flavor]
    text = ";".join(f"{k}:{','.join(map(str, v))}" for k, v in zip("*SDH", (attn, se, mr, li)))
    assert hyena_flavors[flavor].layout == parse_layout(text)


@pytest.mark.parametrize(
    ("flavor", "billions"),
    [("evo2_1b", 1.108), ("evo2_7b", 6.48), ("evo2_7b_1m", 6.58), ("evo2_40b", 40.33), ("evo2_40b_1m", 41.12)],
)
def test_evo2_parameter_counts_match_published(flavor, billions):
    args = copy.deepcopy(hyena_flavors[flavor])
    with torch.device("meta"):
        model = StripedHyena(args)
    nparams, _ = args.get_nparams_and_flops(model, 8192)
    assert abs(nparams / 1e9 - billions) < 0.006
    a = hyena_flavors[flavor]
    assert (a.vocab_size, a.tie_embeddings, a.norm_eps, a.head_dim) == (512, True, 1e-6, 128)


def test_flops_follow_the_evo2_model():
    args = tiny_args(layout="SDH*", vocab_size=64)
    d, f, v, seq = 32, 48, 64, 256
    per_layer = 2 * 3 * d * d + 2 * d * d + 2 * 3 * f * d
    featurizer = 2 * 3 * 3 * d
    forward = (
        2 * d * v
        + 4 * per_layer
        + 3 * featurizer
        + 2 * 7 * d
        + 2 * 128 * d
        + 10 * math.log2(seq) * d
        + 4 * d * seq  # attention
    )
    _, flops = args.get_nparams_and_flops(tiny_model(), seq)
    assert flops == pytest.approx(3 * forward)


def test_rmsnorm_adds_eps_outside_the_square_root():
    norm = RMSNorm(4, eps=0.5)
    y = norm(torch.ones(1, 4))
    assert torch.allclose(y, torch.full((1, 4), 1 / 1.5))  # 1 / (rms + eps), not 1 / sqrt(ms + eps)


def test_mlp_gelu_in_layer_zero_only_or_everywhere():
    acts = [b.mlp.activation for b in tiny_model().layers.values()]
    assert acts == ["gelu", "identity", "identity", "identity"]
    acts = [b.mlp.activation for b in tiny_model(mlp_activation="gelu").layers.values()]
    assert acts == ["gelu"] * 4


def reference_attention(x, wqkv, wo, bo, heads, theta, factor):
    """vortex MHA: column_split permutes (head, qkv, d) rows to [q; k; v]; NeoX rotary on the full head."""
    b, seqlen, dim = x.shape
    hd = dim // heads
    w = wqkv.view(heads, 3, hd, dim).transpose(0, 1).reshape(3 * dim, dim)
    q, k, v = (t.view(b, seqlen, heads, hd).transpose(1, 2) for t in (x @ w.T).split(dim, -1))
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    freqs = torch.outer(torch.arange(seqlen).float() / factor, inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rot(t):
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat([-t2, t1], -1) * sin

    scores = rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(seqlen, seqlen).triu(1).bool(), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, seqlen, dim)
    return out @ wo.T + bo


def test_attention_head_qkv_row_layout_neox_rope_and_position_interpolation():
    model = tiny_model(layout="*", rope_theta=1000.0, rope_pi_factor=4.0)
    attn: Attention = model.layers["0"].mixer
    x = torch.randn(2, 11, 32)
    from torchtitan_hyena.models.common.rope import rope_tables

    cos, sin = rope_tables(model.rope_inv_freq, torch.arange(11).float() / 4.0)
    got = attn(x, cos, sin)
    want = reference_attention(x, attn.wqkv.weight, attn.out_proj.weight, attn.out_proj.bias, 2, 1000.0, 4.0)
    assert torch.allclose(got, want, atol=1e-5)


def test_forward_causal_positions_and_tied_head():
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 20))
    logits = model(tokens)
    assert logits.shape == (2, 20, 64)
    assert torch.allclose(model(tokens, torch.arange(20)), logits)
    changed = tokens.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 64
    diff = (model(changed) - logits).abs()
    assert diff[:, :15].max() < 1e-5 and diff[:, 15:].max() > 1e-3
    assert model.output is None and not any("output" in n for n in model.state_dict())
    untied = tiny_model(tie_embeddings=False)
    assert untied.output is not None and "output.weight" in untied.state_dict()


def test_init_is_name_keyed_and_follows_savanna():
    a, b = tiny_model(), tiny_model()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    params = dict(a.named_parameters())
    assert torch.all(params["layers.2.mixer.filter.p"] == -1)
    gamma = params["layers.2.mixer.filter.gamma"]
    assert gamma.min() >= math.log(0.01) - 1e-6 and gamma.max() <= math.log(0.1) + 1e-6
    assert params["layers.1.mixer.filter.h_hat"].abs().max() < 1e-5 / math.sqrt(8192) * 6
    emb = params["tok_embeddings.weight"]
    assert abs(emb.std().item() - math.sqrt(2 / (5 * 32))) < 0.02
    assert torch.all(params["layers.3.mixer.out_proj.bias"] == 0)
    assert tiny_model(embedding_init_std=1.0).tok_embeddings.weight.std() > 0.8


def test_filters_are_exempt_from_weight_decay():
    from torchtitan_hyena.components.optimizer import _no_decay

    model = tiny_model()
    exempt = _no_decay(model)
    names = {n for n, p in model.named_parameters() if id(p) in exempt}
    assert {"layers.0.mixer.filter.h", "layers.1.mixer.filter.h_hat", "layers.2.mixer.filter.p"} <= names
    assert "layers.0.mixer.projections.weight" not in names


def test_li_parameters_stay_fp32_when_cast():
    model = cast_model_(tiny_model(), torch.bfloat16)
    assert [type(m).__name__ for m in fp32_modules(model)] == ["ImplicitModalFilter"]
    assert model.layers["2"].mixer.filter.p.dtype == torch.float32
    assert model.layers["2"].mixer.projections.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 64, (1, 8))).dtype == torch.bfloat16


def test_freeform_li_filter_option():
    model = tiny_model(li_filter="implicit_freeform")
    logits = model(torch.randint(0, 64, (2, 16)))
    logits.sum().backward()
    freq = model.layers["2"].mixer.filter.mlp[1].freq
    assert torch.all(freq == 14.0) and freq.grad is not None


def test_dropout_options_are_training_only():
    model = tiny_model(attention_dropout=0.5, hidden_dropout=0.5)
    tokens = torch.randint(0, 64, (1, 12))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))


def test_config_overrides_and_validation():
    from torchtitan_hyena.config import ConfigManager

    c = ConfigManager().parse_args(["--model.layout", "S:0;*:1", "--model.mlp_activation", "gelu",
                                    "--training.seq_len", "4096", "--model.hidden_dropout", "0.1",
                                    "--model.rope_pi_factor", "8", "--model.rope_theta", "1e6"])  # fmt: skip
    args = copy.deepcopy(hyena_flavors["debugmodel"])
    args = args.with_config(c)
    assert (args.layout, args.n_layers, args.mlp_activation, args.max_seq_len) == ("S*", 2, "gelu", 4096)
    assert (args.rope_pi_factor, args.rope_theta, args.hidden_dropout) == (8.0, 1e6, 0.1)
    with pytest.raises(ConfigError, match="model.hidden_dropout must be in"):
        ConfigManager().parse_args(["--model.hidden_dropout", "1.5"])
    c.model.hidden_dropout = 1.5  # past the config check (set in code): the model args refuse it too
    with pytest.raises(ConfigError, match="hidden_dropout"):
        args.with_config(c)


def test_tensor_parallel_divisibility_errors():
    args = tiny_args(filter_groups=4, n_heads=2)
    check_tp_divisibility(args, 2)
    with pytest.raises(ConfigError, match="filter groups"):
        check_tp_divisibility(tiny_args(filter_groups=2, n_heads=4, dim=32), 4)
    with pytest.raises(ConfigError, match="n_heads = 2"):
        check_tp_divisibility(args, 4)
    with pytest.raises(ConfigError, match="implicit_freeform"):
        check_tp_divisibility(tiny_args(li_filter="implicit_freeform"), 2)


def test_activation_checkpointing_and_compile_match_eager():
    from torchtitan_hyena.distributed.activation_checkpoint import apply_ac

    tokens = torch.randint(0, 64, (2, 24))

    def grads(model):
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    base = grads(tiny_model())
    for mode, option in (("full", "1"), ("selective", "op")):
        model = tiny_model()
        apply_ac(model.layers, mode, option)
        for n, g in grads(model).items():
            assert torch.allclose(g, base[n.replace("._checkpoint_wrapped_module", "")], atol=1e-6), (mode, n)
    model = tiny_model()
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, backend="aot_eager", fullgraph=True)
    for n, g in grads(model).items():
        assert torch.allclose(g, base[n.replace("._orig_mod", "")], atol=1e-5), n


def test_dry_run_has_a_hyena_activation_model():
    import dataclasses

    from torchtitan_hyena.protocols.train_spec import get_train_spec
    from torchtitan_hyena.tools.activation_memory import ActivationInputs

    estimate = get_train_spec("hyena").activation_estimator
    args = hyena_flavors["neural_pile_hybrid_8b"]
    s = ActivationInputs(microbatch=1, seq_len=4096, tp=1, cp=1, act_bytes=2, ac_mode="none", ac_option="1",
                         loss_parallel=False)  # fmt: skip
    none = estimate(args, s)
    full = estimate(args, dataclasses.replace(s, ac_mode="full"))
    tp8 = estimate(args, dataclasses.replace(s, ac_mode="full", tp=8))
    assert full.saved < none.saved / 10 and full.peak < none.peak
    assert tp8.peak < full.peak  # sequence parallel shards the saved block inputs
    block_inputs = 32 * 2 * 4096 * 4096  # full AC keeps each block's bf16 input
    assert block_inputs < full.saved < 1.5 * block_inputs

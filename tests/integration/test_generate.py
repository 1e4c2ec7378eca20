"""Generation: cached decode equals the stateless forward for every block type of both families, sampling is
reproducible and batch-independent, and the CLI works from converted and trained checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from tests.conftest import REPO, TINY, run_cli
from tests.helpers.evo2_ckpt import CONFIG, fake_evo2_state, reference_logits
from tests.helpers.llama_ckpt import tiny_hf_model
from torchtitan_hyena import generate as gen
from torchtitan_hyena.components.sampling import Sampling, filtered_probs, sample_next, sequence_generators
from torchtitan_hyena.errors import UserError
from torchtitan_hyena.models.common.decode import DecodeCache
from torchtitan_hyena.models.common.precision import cast_model_
from torchtitan_hyena.models.hyena.args import HyenaArgs
from torchtitan_hyena.models.hyena.model import StripedHyena
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.models.llama3.model import Transformer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

MR_TAPS = 128
PROMPTS = MR_TAPS + 4  # prefill lengths 1..132: shorter than the featurizer, SE and MR filters, and beyond them
STEPS = 3


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that every block moves the logits (the inits make MR taps ~1e-7), poles kept stable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".p", ".gamma")):
                continue  # the init's log-poles are negative; keep them
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif "tok_embeddings" in name:
                p.copy_(noise)
            else:
                p.copy_(noise * (0.5 if p.dim() == 1 else 1 / math.sqrt(p.shape[-1])))
    return model.eval()


def hyena(layout: str, seed: int = 0, **kw) -> StripedHyena:
    """Every Hyena block type and attention with position interpolation (factor 4), channels in 4 filter groups."""
    sizes = dict(dim=32, n_heads=2, ffn_hidden_dim=32, filter_groups=4, vocab_size=64, max_seq_len=256)
    args = HyenaArgs(layout=layout, conv_impl="torch", rope_pi_factor=4.0, **(sizes | kw))
    model = StripedHyena(args)
    model.init_weights(seed=seed)
    return randomize_(model, seed)


def llama(seed: int = 0) -> Transformer:
    """GQA (4 query heads over 2 KV heads) and Llama-3.1 RoPE scaling."""
    args = Llama3Args(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, rope_theta=1e4,
                      rope_scaling="llama3", rope_original_max_position=64, max_seq_len=256)  # fmt: skip
    model = Transformer(args)
    model.init_weights(seed=seed)
    return randomize_(model, seed)


MODELS = {
    "hyena-SE": lambda: hyena("S"),
    "hyena-MR": lambda: hyena("D"),
    "hyena-LI": lambda: hyena("H"),
    "hyena-attention": lambda: hyena("*"),
    "hyena-SDH*": lambda: hyena("SDH*"),
    "llama": llama,
}


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_every_step_matches_the_stateless_forward_after_any_prefill(name):
    """Row k of one batch is prefilled with the first k tokens (k = 1..132, right-padded), then steps; every
    logit row equals the stateless forward at the same position."""
    model = MODELS[name]()
    sequence = torch.randint(0, 64, (1, PROMPTS + STEPS), generator=torch.Generator().manual_seed(1))
    reference = model(sequence)[0]  # causal: position t is the forward of the prefix of t + 1 tokens
    lengths = torch.arange(1, PROMPTS + 1)
    prompts = sequence[:, :PROMPTS].expand(PROMPTS, -1).clone()
    for k in lengths.tolist():
        prompts[k - 1, k:] = 0  # padding that the cached forward must ignore
    cache = DecodeCache(lengths, capacity=PROMPTS + STEPS)
    got = [model(prompts, cache=cache)[:, 0]]
    for step in range(STEPS):
        got.append(model(sequence[0, lengths + step][:, None], cache=cache)[:, 0])
    for step, logits in enumerate(got):
        want = reference[lengths - 1 + step]
        err = (logits - want).abs().amax(-1)
        assert err.max() <= 1e-4, f"step {step}: worst prefill length {int(err.argmax()) + 1}, error {err.max():.2e}"
    assert reference.std() > 0.5  # the logits are far from flat, so the comparison means something


@torch.no_grad()
def test_bfloat16_steps_track_the_bfloat16_forward():
    model = cast_model_(hyena("SDH*"), torch.bfloat16)  # LI filters keep fp32 parameters
    sequence = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(2))
    reference = model(sequence)[0].float()
    cache = DecodeCache(torch.tensor([30]), capacity=40)
    got = [model(sequence[:, :30], cache=cache)[0, 0]]
    got += [model(sequence[:, t : t + 1], cache=cache)[0, 0] for t in range(30, 40)]
    err = (torch.stack(got).float() - reference[29:]).abs().max()
    assert err <= 0.05 * reference.abs().max(), err


def stateless_greedy(model, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt) :]


@torch.no_grad()
def test_greedy_is_the_argmax_of_the_stateless_forward_repeated():
    model = hyena("SDH*", seed=3)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (1, 9, 130)]
    out = gen.generate(model, prompts, 12, Sampling(temperature=0), batch_size=3)
    for prompt, completion in zip(prompts, out):
        assert completion.tokens == stateless_greedy(model, prompt, 12)
        assert not completion.stopped_at_eod


@torch.no_grad()
def test_batched_equals_one_at_a_time_and_the_seed_fixes_the_samples():
    model = llama(seed=4)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 17, 2, 11)]
    sampling = Sampling(temperature=1.3, top_k=20, top_p=0.9, seed=7)
    batched = gen.generate(model, prompts, 16, sampling, batch_size=4)
    single = gen.generate(model, prompts, 16, sampling, batch_size=1)
    assert [c.tokens for c in batched] == [c.tokens for c in single]
    assert [c.tokens for c in gen.generate(model, prompts, 16, sampling, batch_size=3)] == [c.tokens for c in batched]
    other = gen.generate(model, prompts, 16, Sampling(temperature=1.3, top_k=20, top_p=0.9, seed=8), batch_size=4)
    assert [c.tokens for c in other] != [c.tokens for c in batched]
    eod = batched[0].tokens[3]  # stop prompt 0 at its 4th token (or earlier if that id comes sooner)
    stopped = gen.generate(model, prompts[:1], 16, sampling, eod_id=eod)[0]
    assert stopped.stopped_at_eod and stopped.tokens == batched[0].tokens[: batched[0].tokens.index(eod)]


def test_sampling_filters_and_draws():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    probs, order = filtered_probs(logits, Sampling(top_k=2))
    assert order[0, :2].tolist() == [4, 0] and probs[0, 2:].eq(0).all()
    probs, _ = filtered_probs(logits, Sampling(top_p=0.5))  # softmax mass of token 4 alone is 0.61
    assert probs[0, 1:].eq(0).all() and probs[0, 0] > 0.6
    assert sample_next(logits, Sampling(temperature=0), []).tolist() == [4]
    draws = [sample_next(logits, Sampling(top_k=2), sequence_generators(0, [i])).item() for i in range(400)]
    assert set(draws) == {0, 4} and 0.6 < draws.count(4) / 400 < 0.85  # p(4 | top-2) = 0.73
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(UserError):
            Sampling(**bad)


def test_freeform_li_filters_refuse_to_generate():
    model = hyena("H", li_filter="implicit_freeform")
    with pytest.raises(UserError, match="implicit_freeform"):
        gen.generate(model, [[1, 2, 3]], 2)


# ------------------------------------------------------------------------------------------ checkpoints and CLI
def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_converted_evo2_checkpoint_generates_dna_greedily_like_a_vortex_style_forward(tmp_path):
    from torchtitan_hyena.convert import evo2

    state = fake_evo2_state()
    torch.save(state, tmp_path / "tiny.pt")
    (tmp_path / "tiny.yml").write_text(yaml.safe_dump(CONFIG))
    ckpt = evo2.convert_evo2_to_dcp(tmp_path / "tiny.pt", str(tmp_path / "tiny.yml"), tmp_path / "dcp")
    prompts = ["ACGTTGCA", "GATTACAGATTACAGATTACA", "T"]  # the tiny config has 64 positions
    out = tmp_path / "out.jsonl"
    args = ["--checkpoint", str(ckpt), "--max_new_tokens", "20", "--temperature", "0", "--output", str(out)]
    gen.main([*args, *(a for p in prompts for a in ("--prompt", p)), "--batch_size", "2"])
    rows = read_rows(out)
    for prompt, row in zip(prompts, rows):
        tokens = list(prompt.encode())
        for _ in range(20):
            tokens.append(int(reference_logits(state, torch.tensor([tokens]))[0, -1].argmax()))
        assert row["tokens"] == tokens[len(prompt) :] and row["stop"] == "max_new_tokens"
        assert row["text"] == gen.decode_bytes(row["tokens"])  # ids >= 256 of the 512-vocab become U+FFFD
    assert gen.decode_bytes([65, 67, 300, 71, 0xC3, 0xA9]) == "AC\ufffdG\u00e9"

    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">seq{i} test\n{p[:5]}\n{p[5:]}\n" for i, p in enumerate(prompts)))
    gen.main([*args[:-1], str(tmp_path / "fa.jsonl"), "--fasta", str(fasta), "--batch_size", "3"])
    by_fasta = read_rows(tmp_path / "fa.jsonl")
    assert [r["id"] for r in by_fasta] == ["seq0", "seq1", "seq2"]
    assert [r["tokens"] for r in by_fasta] == [r["tokens"] for r in rows]


@pytest.mark.parametrize("target", ["llama3", "hyena"])
def test_converted_llama_checkpoint_generates_like_transformers(tmp_path, target):
    """A Llama-3.1 checkpoint (GQA, RoPE scaling) converted to Llama 3, or to an all-attention hybrid (fused wqkv,
    rotate-half RoPE; eps ~0 so that the two RMSNorm forms coincide): greedy tokens are transformers' greedy tokens."""
    from torchtitan_hyena.convert.cli import llama_to_dcp_main

    hf = tiny_hf_model(rms_norm_eps=1e-12)
    hf.generation_config.eos_token_id = None  # greedy to the end, as --eod_id is unset
    hf.save_pretrained(tmp_path / "hf")
    layout = ["--target", "hyena", "--layout", "**"] if target == "hyena" else []
    llama_to_dcp_main(["--input_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "dcp"), "--keep_embeddings",
                       *layout])  # fmt: skip
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (7, 30)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"tokens": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    gen.main(["--checkpoint", str(tmp_path / "dcp"), "--prompt_tokens", str(tmp_path / "in.jsonl"),
              "--max_new_tokens", "10", "--temperature", "0", "--output", str(out)])  # fmt: skip
    for prompt, row in zip(prompts, read_rows(out)):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        assert row["tokens"] == want[0, len(prompt) :].tolist() and "text" not in row


@pytest.mark.slow
def test_cli_from_a_training_step_folder(tmp_path):
    """Train the hyena debug model one step, then generate from the step folder: greedy equals the stateless
    argmax, sampling is reproducible, and a DNA prompt is refused for this Neural Pile model."""
    from torchtitan_hyena.build import load_model

    config = [str(REPO / "train_configs" / "debug_hyena.toml") if a.endswith("debug_model.toml") else a for a in TINY]
    train = run_cli([*config, "--training.steps", "1", "--training.seq_len", "64", "--checkpoint.enable", "true",
                     "--checkpoint.interval", "1", "--job.dump_folder", str(tmp_path / "run")])  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    step = tmp_path / "run" / "checkpoint" / "step-1"
    prompts = [[3, 0, 5, 255, 1], [7] * 20]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"tokens": p}) + "\n" for p in prompts))
    base = ["--checkpoint", str(step), "--prompt_tokens", str(tmp_path / "in.jsonl"), "--max_new_tokens", "8"]
    greedy = tmp_path / "greedy.jsonl"
    proc = run_cli([*base, "--temperature", "0", "--output", str(greedy)], module="torchtitan_hyena.generate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_model(step, torch.device("cpu"))
    with torch.no_grad():
        assert [r["tokens"] for r in read_rows(greedy)] == [stateless_greedy(model, p, 8) for p in prompts]
    for name in ("a", "b"):
        gen.main([*base, "--top_k", "50", "--seed", "3", "--output", str(tmp_path / name)])
    assert read_rows(tmp_path / "a") == read_rows(tmp_path / "b")
    with pytest.raises(UserError, match="trained on Neural Pile spike counts, not bytes; use --prompt_tokens"):
        gen.main([*base[:2], "--prompt", "ACGT", "--max_new_tokens", "4", "--output", str(tmp_path / "dna.jsonl")])
    assert not (tmp_path / "dna.jsonl").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny hyena model saved as a converter would (DCP + model_args.json), with 64 positions."""
    import torch.distributed.checkpoint as dcp

    from torchtitan_hyena.protocols.model import write_model_args

    folder = tmp_path_factory.mktemp("ckpt")
    model = hyena("SDH*", vocab_size=256, max_seq_len=64)
    dcp.save(model.state_dict(), checkpoint_id=str(folder), no_dist=True)
    write_model_args(folder, "hyena", "custom", model.args)
    return folder


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--prompt", ""], "is empty"),
        (["--prompt", "ACGTé"], "holds 'é' (U+00E9)"),
        (["--prompt", "AC\tGT"], "holds '\\t'"),
        (["--prompt", "A" * 60], "plus --max_new_tokens 8 is beyond the model's 64 positions; use --max_new_tokens 4"),
        (["--prompt", "A" * 65], "a prompt of 65 tokens is beyond the model's 64 positions"),
        (["--prompt_tokens", "{tokens}"], "prompt 2 is empty"),
        (["--prompt_tokens", "{big}"], "prompt token 300 is >= the model's vocab_size 256"),
        (["--prompt_tokens", "{missing}"], "--prompt_tokens"),
        (["--prompt", "ACGT", "--temperature", "-1"], "--temperature must be >= 0"),
        (["--prompt", "ACGT", "--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--prompt", "ACGT", "--batch_size", "0"], "--batch_size must be positive"),
        (["--prompt", "ACGT", "--eod_id", "-2"], "--eod_id must be a token id, or -1 for none"),
        (["--prompt", "ACGT", "--checkpoint", "{empty}"], "model_args.json not found"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_write_nothing(tiny_checkpoint, tmp_path, extra, fragment):
    (tmp_path / "tokens.jsonl").write_text('{"tokens": [1, 2]}\n{"tokens": []}\n')
    (tmp_path / "big.jsonl").write_text('{"tokens": [1, 300]}\n')
    (tmp_path / "empty").mkdir()
    names = {"tokens": "tokens.jsonl", "big": "big.jsonl", "missing": "nope.jsonl", "empty": "empty"}
    extra = [str(tmp_path / names[a[1:-1]]) if a.startswith("{") else a for a in extra]
    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError) as info:
        gen.main(["--checkpoint", str(tiny_checkpoint), "--max_new_tokens", "8", "--output", str(out), *extra])
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and not list(tmp_path.glob("out.jsonl*"))


def test_cli_prints_one_line_and_exits_nonzero(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = run_cli(
        ["--checkpoint", str(tiny_checkpoint), "--prompt", "", "--max_new_tokens", "2", "--output", str(out)],
        module="torchtitan_hyena.generate",
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --prompt 1 is empty; a prompt needs at least one character"
    ]
    assert not out.exists()

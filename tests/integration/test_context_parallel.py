"""Context parallelism: layout, masks, halos, block kernels and channel slices in-process; collectives and whole
training runs (Llama 3 and StripedHyena 2; CP 2/4, all-gather and ring; CP x FSDP, CP x TP, HSDP x CP) on real
gloo processes against one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, TINY, assert_losses_close, env, torchrun_losses
from torchtitan_hyena.config import ConfigManager
from torchtitan_hyena.distributed.context_parallel import attention as cp_attention
from torchtitan_hyena.distributed.context_parallel.collectives import halo_plan
from torchtitan_hyena.distributed.context_parallel.layout import (
    ChannelSlice,
    ContextParallel,
    block_kind,
    chunk_ids,
    key_extent,
    local_positions,
    natural_order,
    shard_sequence,
)
from torchtitan_hyena.distributed.parallel_dims import ParallelDims
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.models.hyena import hyena_flavors
from torchtitan_hyena.models.hyena.args import HyenaArgs
from torchtitan_hyena.models.hyena.filters import (
    ExplicitFilter,
    ExplicitSingleDecayFilter,
    ImplicitFreeformFilter,
    ImplicitModalFilter,
)
from torchtitan_hyena.models.hyena.parallelize import validate_hyena_parallelism


# ---------------------------------------------------------------------------------------------- layout and masks
def unshard_sequence(shards: list[torch.Tensor]) -> torch.Tensor:
    """The whole sequence back from every rank's shard (rank order), through the layout's natural order."""
    local = [half for shard in shards for half in shard.chunk(2, dim=1)]
    return torch.cat([local[i] for i in natural_order(len(shards))], dim=1)


@pytest.mark.parametrize("degree", [1, 2, 3, 4])
def test_load_balanced_shards_round_trip_with_global_positions(degree):
    x = torch.arange(2 * 8 * degree * 3).view(2, 8 * degree, 3)
    shards = [shard_sequence(x, r, degree) for r in range(degree)]
    assert torch.equal(unshard_sequence(shards), x)
    c = 4
    for r, shard in enumerate(shards):
        a, b = chunk_ids(r, degree)
        assert (a, b) == (r, 2 * degree - 1 - r)
        positions = local_positions(8 * degree, r, degree)
        assert torch.equal(positions, torch.cat([torch.arange(a * c, a * c + c), torch.arange(b * c, b * c + c)]))
        assert torch.equal(shard[0, :, 0], x[0, positions, 0])


@pytest.mark.parametrize("degree", [1, 2, 3, 4])
def test_load_balanced_masks_are_the_global_causal_mask_and_balance_the_work(degree):
    c = 3
    seq = 2 * degree * c
    work = set()
    for r in range(degree):
        q_pos = local_positions(seq, r, degree)
        expected = q_pos[:, None] >= torch.arange(seq)[None, :]  # local queries x keys in sequence order
        # all-gather: chunk i attends the key prefix ending with its chunk, bottom-right aligned causal mask
        gathered = torch.zeros(2 * c, seq, dtype=torch.bool)
        for i, g in enumerate(chunk_ids(r, degree)):
            end = key_extent(g, c)
            gathered[i * c : (i + 1) * c, :end] = torch.ones(c, end, dtype=torch.bool).tril(end - c)
        assert torch.equal(gathered, expected)
        # ring: blocks against every rank's chunks, full or diagonal-causal or skipped
        ring = torch.zeros(2 * c, seq, dtype=torch.bool)
        for src in range(degree):
            for i, qg in enumerate(chunk_ids(r, degree)):
                for kg in chunk_ids(src, degree):
                    kind = block_kind(qg, kg)
                    block = {"full": torch.ones(c, c), "causal": torch.ones(c, c).tril(), None: torch.zeros(c, c)}[kind]
                    ring[i * c : (i + 1) * c, kg * c : (kg + 1) * c] = block.bool()
        assert torch.equal(ring, expected)
        work.add(int(expected.sum()))
    assert len(work) == 1  # every rank computes the same number of query-key pairs


@pytest.mark.parametrize("degree", [1, 2, 3, 4])
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_halo_plan_delivers_the_positions_before_each_chunk(degree, chunk):
    seq = torch.arange(1, 2 * degree * chunk + 1, dtype=torch.float32)  # 0 marks "before the sequence"
    local = [shard_sequence(seq[None, :, None], r, degree)[0, :, 0].view(2, chunk) for r in range(degree)]
    for width in range(1, 3 * chunk + 2):  # up to halos spanning several chunks and the sequence start
        halos = [torch.zeros(2, width) for _ in range(degree)]
        for t in halo_plan(degree, chunk, width):
            piece = local[t.src_rank][t.src_slot, t.src_start : t.src_start + t.length]
            halos[t.dst_rank][t.dst_slot, t.dst_start : t.dst_start + t.length] = piece
        padded = torch.cat([torch.zeros(width), seq])
        for r in range(degree):
            for slot, g in enumerate(chunk_ids(r, degree)):
                assert torch.equal(halos[r][slot], padded[g * chunk : g * chunk + width]), (degree, chunk, width, r)


def test_shard_batch_shards_every_sequence_tensor_and_adds_positions():
    cp = ContextParallel(group=None, rank=1, degree=2)
    batch = {
        "input": torch.arange(16).view(2, 8),
        "labels": torch.arange(16).view(2, 8) + 1,
        "loss_weights": torch.rand(2, 8),
        "ids": torch.tensor([7, 9]),
    }
    out = cp.shard_batch(batch)
    assert torch.equal(out["positions"], torch.tensor([2, 3, 4, 5]))
    for key in ("input", "labels", "loss_weights"):
        assert torch.equal(out[key], batch[key][:, 2:6])
    assert out["ids"] is batch["ids"]
    with pytest.raises(ValueError, match="not divisible"):
        cp.shard_batch({"input": torch.zeros(1, 6)})


# ---------------------------------------------------------------------------------------------- ring kernels
@pytest.mark.parametrize("kernel", ["cpu", "matmul"])
def test_ring_block_kernels_merge_to_attention(kernel, monkeypatch):
    """Two key blocks (earlier keys: full; own chunk: diagonal-causal) merged by log-sum-exp, forward and
    backward from the final output and log-sum-exp, equal SDPA over the concatenated keys (GQA 4 over 2)."""
    monkeypatch.setattr(cp_attention, "SCORE_ELEMENTS", 2 * 4 * 8 * 16)  # several row chunks in the matmul kernel
    g = torch.Generator().manual_seed(0)
    c = 16
    q = torch.randn(2, 4, c, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 2 * c, 8, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.ones(c, 2 * c, dtype=torch.bool).tril(c)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)
    grad = torch.randn(ref.shape, generator=g)
    ref.backward(grad)

    def fwd(qq, kk, vv, causal):
        if kernel == "cpu":
            return cp_attention.block_forward(qq, kk, vv, 0.3, causal)
        rep = qq.shape[1] // kk.shape[1]
        return cp_attention._matmul_forward(qq, kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1), 0.3, causal)

    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out = torch.zeros(q.shape)
    lse = torch.full(q.shape[:3], float("-inf"))
    blocks = [(slice(0, c), False), (slice(c, 2 * c), True)]
    for cols, causal in blocks:
        cp_attention._merge(out, lse, *fwd(qd, kd[:, :, cols], vd[:, :, cols], causal))
    assert torch.allclose(out, ref, atol=1e-6)
    dq, dk, dv = torch.zeros_like(qd), torch.zeros_like(kd), torch.zeros_like(vd)
    for cols, causal in blocks:
        if kernel == "cpu":
            bq, bk, bv = cp_attention.block_backward(grad, qd, kd[:, :, cols], vd[:, :, cols], out, lse, 0.3, causal)
        else:
            kk, vv = kd[:, :, cols].repeat_interleave(2, 1), vd[:, :, cols].repeat_interleave(2, 1)
            bq, bk, bv = cp_attention._matmul_backward(grad, qd, kk, vv, out, lse, 0.3, causal)
            bk, bv = bk.unflatten(1, (2, 2)).sum(2), bv.unflatten(1, (2, 2)).sum(2)
        dq += bq
        dk[:, :, cols] += bk
        dv[:, :, cols] += bv
    for mine, theirs in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        assert torch.allclose(mine, theirs, atol=1e-5)


# ---------------------------------------------------------------------------------------------- hyena channel slices
def _filter(name: str, conv_impl: str) -> torch.nn.Module:
    filt = {
        "se": lambda: ExplicitFilter(4, 7, conv_impl),
        "mr": lambda: ExplicitSingleDecayFilter(4, 32, 64, "weak", conv_impl),  # > 16 taps: Triton's Toeplitz path
        "li": lambda: ImplicitModalFilter(32, 4, conv_impl),
        "freeform": lambda: ImplicitFreeformFilter(32, 5, 8, 1.0, 1),
    }[name]()
    filt.init_weights(0, name)
    return filt


@pytest.mark.parametrize(
    ("name", "conv_impl"), [("se", "torch"), ("mr", "torch"), ("li", "torch"), ("freeform", "torch"), ("se", "triton"),
                            ("mr", "triton"), ("li", "triton")],
)  # fmt: skip
def test_filter_on_a_channel_slice_is_that_slice_of_the_filter(name, conv_impl):
    """What a rank computes after the all-to-all: ungated conv of k*v on its channels (gates outside), with the
    expanded all-ones gates the all-to-all path passes (Triton kernels under the interpreter on CPU)."""
    filt, reference = _filter(name, conv_impl), _filter(name, "torch")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 40, 32, generator=g) for _ in range(3))
    skip = None if name == "se" else torch.randn(32, generator=g)
    full = reference.gated_conv(q, k, v, skip)
    for start, stop in ((0, 16), (16, 32), (8, 24)):
        part = ChannelSlice(start, stop, 32)
        s = (k * v)[..., start:stop].requires_grad_()
        ones = s.new_ones(()).expand_as(s)
        y = filt.gated_conv(ones, s, ones, None if skip is None else skip[start:stop], part)
        assert torch.allclose(q[..., start:stop] * y, full[..., start:stop], atol=1e-5)
        y.sum().backward()  # the backward runs with the expanded gates too
    with pytest.raises(ValueError, match="split a group"):
        ChannelSlice(1, 3, 8).rows(torch.zeros(4, 7))


def test_hyena_cp_layouts_are_validated_before_the_model_is_built():
    def check(args: HyenaArgs, cp: int, tp: int = 1, *cli: str) -> None:
        dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=cp, tp=tp, world_size=cp * tp)
        validate_hyena_parallelism(args, dims, ConfigManager().parse_args(list(cli)))

    debug = hyena_flavors["debugmodel"]  # dim 256, 16 filter groups
    check(debug, cp=4, tp=2)
    check(debug, 8, 2, "--parallelism.context_parallel_mr_method", "alltoall")
    with pytest.raises(ConfigError, match=r"context_parallel_degree 3 does not divide .*\(Hyena-LI channels\) = 256"):
        check(debug, cp=3)
    with pytest.raises(ConfigError, match=r"degree 16 does not divide .*\(Hyena-MR groups\) = 8"):
        check(debug, 16, 2, "--parallelism.context_parallel_mr_method", "alltoall")
    dropout = HyenaArgs(**{**debug.__dict__, "attention_dropout": 0.1})
    check(dropout, cp=2)
    with pytest.raises(ConfigError, match="attention_dropout needs context_parallel_rotate_method allgather"):
        check(dropout, 2, 1, "--parallelism.context_parallel_rotate_method", "ring")


def test_dry_run_activation_estimate_shrinks_with_context_parallelism():
    import dataclasses

    from torchtitan_hyena.models.hyena.activations import hyena_activations
    from torchtitan_hyena.models.llama3 import llama3_flavors
    from torchtitan_hyena.models.llama3.activations import llama3_activations
    from torchtitan_hyena.tools.activation_memory import ActivationInputs

    s = ActivationInputs(microbatch=1, seq_len=131072, tp=8, cp=1, act_bytes=2, ac_mode="full", ac_option="1",
                         loss_parallel=True)  # fmt: skip
    for estimate, args in ((llama3_activations, llama3_flavors["8B"]), (hyena_activations, hyena_flavors["evo2_7b"])):
        one, no_ac = estimate(args, s), estimate(args, dataclasses.replace(s, ac_mode="none"))
        for cp in (2, 4, 8):
            ring = estimate(args, dataclasses.replace(s, cp=cp, cp_rotate="ring"))
            assert ring.saved == pytest.approx(one.saved / cp, rel=0.01)  # full AC keeps block inputs: 1/cp
            assert one.peak / cp <= ring.peak < one.peak
            ring = estimate(args, dataclasses.replace(s, ac_mode="none", cp=cp, cp_rotate="ring"))
            gather = estimate(args, dataclasses.replace(s, ac_mode="none", cp=cp))
            assert no_ac.saved / cp <= ring.saved < 1.3 * no_ac.saved / cp  # hyena: + the all-to-all tensors
            assert ring.saved < gather.saved < no_ac.saved  # all-gather: K/V of the whole sequence per layer


# ---------------------------------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_collectives_halos_all_to_all_and_attention_match_one_process(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "tests.helpers.cp_check", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(out.read_text())
    assert len(results) == 2 * 15  # per layout: 5 halo widths, 3 FIRs, the all-to-all, 3 attentions (+ bytes)
    for name, value in results.items():
        if name.endswith("_bytes"):
            continue
        assert value <= 1e-5, (name, value)
    # Ring traffic per rank: K/V blocks N-1 times forward and backward, the fp32 K/V gradients N times.
    kv = 2 * 2 * 2 * 16 * 8 * 4  # (k, v) x batch 2 x 2 KV heads x 16 local tokens x head dim 8, fp32
    for degree in (2, 4):
        assert results[f"cp{degree}/ring_p2p_bytes"] == 2 * (degree - 1) * kv + degree * kv
        assert results[f"cp{degree}/allgather_p2p_bytes"] == results[f"cp{degree}/allgather_backend_p2p_bytes"] == 0


HYENA_TINY = [str(REPO / "train_configs" / "debug_hyena.toml") if a.endswith("debug_model.toml") else a for a in TINY]
# fp32, 5 steps, global batch 2 x 64 tokens (one data-parallel rank under CP alone; CP 4 leaves 16 tokens per rank,
# fewer than the MR filter's taps, so halos span several ranks); lr 1e-3 (see test_tensor_parallel.py).
COMMON = ["--training.steps", "5", "--training.seq_len", "64", "--training.global_batch_size", "2",
          "--optimizer.lr", "1e-3"]  # fmt: skip
MODELS = {"llama": [*TINY, *COMMON], "hyena": [*HYENA_TINY, *COMMON]}
VALIDATION = ["--validation.enable", "true", "--validation.steps", "2", "--validation.freq", "5",
              "--validation.local_batch_size", "2"]  # fmt: skip


def cp(degree: int, method: str = "allgather", shard: int = 1, *extra: str) -> list[str]:
    return ["--parallelism.context_parallel_degree", str(degree), "--parallelism.context_parallel_rotate_method",
            method, "--parallelism.data_parallel_shard_degree", str(shard), *extra]  # fmt: skip


TP2 = ["--parallelism.tensor_parallel_degree", "2"]
CKPT = ["--checkpoint.enable", "true", "--checkpoint.interval", "3"]
LAYOUTS = {
    1: {"single": [*VALIDATION]},
    2: {
        "cp2_allgather": [*cp(2), *VALIDATION],
        "cp2_ring": [*cp(2, "ring"), *VALIDATION],
        "cp2_mr_alltoall": cp(2, "allgather", 1, "--parallelism.context_parallel_mr_method", "alltoall"),
        "cp2_compile_full_ac": cp(2, "ring", 1, "--compile.enable", "true", "--compile.backend", "aot_eager",
                                  "--activation_checkpoint.mode", "full"),
        "cp2_ring_bf16": cp(2, "ring", 1, "--training.mixed_precision_param", "bfloat16"),
    },
    4: {
        "cp4_allgather": cp(4),
        "cp4_ring": cp(4, "ring"),
        "cp2_fsdp2": [*cp(2, "allgather", 2), "--training.local_batch_size", "1"],
        "cp2_tp2": [*cp(2, "ring"), *TP2],
        "hsdp2_cp2": [*cp(2, "ring", 1), "--parallelism.data_parallel_replicate_degree", "2",
                      "--training.local_batch_size", "1"],
        # Save under CP 2 x FSDP 2 after step 3, resume under CP 4 (same dump folder) for steps 4-5.
        "save_cp2_fsdp2": [*cp(2, "allgather", 2), "--training.local_batch_size", "1", *CKPT,
                           "--training.stop_at_step", "3"],
        "resume_cp4": [*cp(4, "ring"), *CKPT],
    },
}  # fmt: skip
SHARED_FOLDER = {"save_cp2_fsdp2": "ckpt", "resume_cp4": "ckpt"}
# The shipped long-context debug config (16k tokens, CP 2, ring attention) as it is, for one step.
LONG = {"hyena/long_config": ["--job.config_file", str(REPO / "train_configs" / "debug_hyena_long.toml"),
                              "--training.steps", "1", "--validation.enable", "false", "--checkpoint.enable", "false",
                              "--metrics.enable_tensorboard", "false", "--job.print_config", "false"]}  # fmt: skip
SKIP = {("llama", "cp2_mr_alltoall")}  # a Hyena-only option


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """{model/layout: {"losses", "grads", "folder"}}, from one torchrun job per world size."""
    root = tmp_path_factory.mktemp("cp")
    out: dict[str, dict] = {}
    for nproc, layouts in LAYOUTS.items():
        names = [(m, n) for m in MODELS for n in layouts if (m, n) not in SKIP]
        folder = root / f"ranks{nproc}"
        (folder / "grads").mkdir(parents=True)
        dumps = {(m, n): root / f"{m}_{SHARED_FOLDER.get(n, n)}" for m, n in names}
        args = [[*MODELS[m], *layouts[n], "--job.dump_folder", str(dumps[m, n])] for m, n in names]
        if nproc == 2:
            for name, extra in LONG.items():
                names.append(tuple(name.split("/")))
                dumps[names[-1]] = root / names[-1][1]
                args.append([*extra, "--job.dump_folder", str(dumps[names[-1]])])
        losses = torchrun_losses(nproc, args, folder, grads_dir=folder / "grads")
        for i, ((m, n), run_losses) in enumerate(zip(names, losses)):
            grads = folder / "grads" / f"{i}.pt"  # absent for a run resumed after step 1
            out[f"{m}/{n}"] = {
                "losses": run_losses,
                "grads": torch.load(grads) if grads.exists() else None,
                "folder": dumps[m, n],
            }
    return out


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        err = (actual[name] - grad).abs().max().item()
        assert err <= atol, f"{name}: max abs gradient difference {err:.2e} > {atol}"


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("layout", ["cp2_allgather", "cp2_ring", "cp4_allgather", "cp4_ring", "cp2_mr_alltoall"])
def test_context_parallel_matches_one_process(runs, model, layout):
    if (model, layout) in SKIP:
        pytest.skip("Hyena-only option")
    single, run = runs[f"{model}/single"], runs[f"{model}/{layout}"]
    assert single["losses"][-1] < single["losses"][0]
    assert_losses_close(run["losses"], single["losses"], rtol=1e-5)
    assert_grads_close(run["grads"], single["grads"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("layout", ["cp2_fsdp2", "cp2_tp2", "hsdp2_cp2"])
def test_context_parallel_composes_with_fsdp_tp_and_hsdp(runs, model, layout):
    single, run = runs[f"{model}/single"], runs[f"{model}/{layout}"]
    assert_losses_close(run["losses"], single["losses"], rtol=1e-5)
    assert_grads_close(run["grads"], single["grads"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_context_parallel_under_compile_and_activation_checkpointing(runs, model):
    single, run = runs[f"{model}/single"], runs[f"{model}/cp2_compile_full_ac"]
    assert_losses_close(run["losses"], single["losses"], rtol=1e-5)
    assert_grads_close(run["grads"], single["grads"], atol=1e-5)


@pytest.mark.slow
def test_long_context_debug_config_trains(runs):
    (loss,) = runs["hyena/long_config"]["losses"]
    assert 3.0 < loss < 7.0  # ~ln(256) at init on 16k-token sequences split over 2 ranks


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_bf16_context_parallel_tracks_fp32(runs, model):
    run = runs[f"{model}/cp2_ring_bf16"]["losses"]
    assert run != runs[f"{model}/cp2_ring"]["losses"]  # bf16 really ran
    assert_losses_close(run, runs[f"{model}/single"]["losses"], rtol=5e-3)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_saved_under_cp2_fsdp2_resumes_under_cp4(runs, model):
    single = runs[f"{model}/single"]["losses"]
    assert_losses_close(runs[f"{model}/save_cp2_fsdp2"]["losses"], single[:3], rtol=1e-5)
    assert_losses_close(runs[f"{model}/resume_cp4"]["losses"], single[3:], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_validation_under_context_parallelism_matches_one_process(runs, model):
    def record(name: str) -> dict:
        (line,) = (Path(runs[f"{model}/{name}"]["folder"]) / "validation.jsonl").read_text().splitlines()
        return json.loads(line)

    single = record("single")
    for name in ("cp2_allgather", "cp2_ring"):
        assert record(name)["tokens"] == single["tokens"]
        assert_losses_close([record(name)["validation_loss"]], [single["validation_loss"]], rtol=1e-5)

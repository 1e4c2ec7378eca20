"""Compile the Triton conv kernels for GPU targets on a machine without a GPU.

    python -m torchtitan_hyena.ops.triton_aot [--targets gfx90a,gfx942,sm90] [--dtype bfloat16] [--first]
        [--kernels li_]

The interpreter checks indexing, not what only the GPU compiler sees (``docs/kernels.md`` §4): dot sizes,
backend options, shared memory (LDS) and registers. This compiles every launch configuration of every kernel
family (``--first``: only the default one) for the given targets, as the JIT would for contiguous (B, L, 4096)
inputs, and prints the compiler's LDS allocation, registers and spills. It fails when a kernel does not compile,
an AMD kernel needs more than 64 KB of LDS or more than ``triton_backend``'s estimate, or a 16-bit configuration (or
any configuration of the Hyena-LI kernels, whose arithmetic is fp32 whatever the input) spills registers. Needs
``TRITON_INTERPRET`` unset; the CUDA register count uses the ``cuobjdump`` Triton ships.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from torchtitan_hyena.ops import triton_backend as tb
from torchtitan_hyena.ops import triton_direct as td
from torchtitan_hyena.ops import triton_fftconv as tf
from torchtitan_hyena.ops import triton_toeplitz as tt

TARGETS = {
    "gfx90a": GPUTarget("hip", "gfx90a", 64),
    "gfx942": GPUTarget("hip", "gfx942", 64),
    "sm90": GPUTarget("cuda", 90, 32),
    "sm80": GPUTarget("cuda", 80, 32),
}
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@dataclass
class Variant:
    """One kernel specialization: the heaviest one of each family (gated, D term, Hyena-MR backward).
    ``fp32_ptrs``: pointer arguments that are fp32 whatever the input dtype (``*_part_ptr`` always are);
    ``no_spills``: spilling is a problem whatever the dtype."""

    name: str
    fn: object
    kind: str
    constexprs: dict
    fp32_ptrs: tuple[str, ...] = ()
    no_spills: bool = False


def variants(dtype: torch.dtype) -> list[Variant]:
    acc, dot = tl.float32, TL_DTYPES[dtype]
    se = dict(K=7, GATED=True, HAS_SKIP=True, LAG_ORDER=False, ACC=acc)
    mr = dict(K=128, CHUNK=128, LAG_ORDER=True, ACC=acc, DOT=dot, HAS_SKIP=True)
    spectra = ("s_ptr", "g_ptr", "h_ptr", "dh_ptr")
    return [
        Variant("direct_fwd", td._direct_fwd_kernel, "direct", se),
        Variant("direct_bwd", td._direct_bwd_kernel, "direct", dict(se, BLOCK_K=8)),
        Variant("toeplitz_pass", tt._pass_kernel, "toeplitz", dict(mr, REVERSE=True, TWO_OUT=True, SKIP_GRAD=True)),
        Variant("filter_grad", tt._filter_grad_kernel, "filter_grad", dict(CHUNK=128, ACC=acc, DOT=dot)),
        Variant("li_gate_in", tf._gate_in_kernel, "li_gate", {}, ("out_ptr",), True),
        Variant("li_gate_out", tf._gate_out_kernel, "li_gate", {}, ("y_ptr", "skip_ptr"), True),
        Variant("li_gate_out_bwd", tf._gate_out_bwd_kernel, "li_gate_bwd", {}, ("conv_ptr", "ds_ptr", "skip_ptr"),
                True),
        Variant("li_modal_filter", tf._modal_filter_kernel, "li_modal", {}, ("lp_ptr", "r_ptr", "h_ptr"), True),
        Variant("li_modal_grad", tf._modal_grad_kernel, "li_modal", dict(BLOCK_M=16), ("dh_ptr", "lp_ptr"), True),
        Variant("li_spectral_fwd", tf._spectral_fwd_kernel, "li_spectral", {}, spectra, True),
        Variant("li_spectral_bwd", tf._spectral_bwd_kernel, "li_spectral", {}, spectra, True),
    ]  # fmt: skip


def _signature(variant: Variant, dtype: torch.dtype) -> tuple[dict, dict, dict]:
    """Signature, constants and divisibility attributes as the JIT specializes them for contiguous inputs:
    channel strides are 1, pointers and row/batch strides multiples of 16."""
    fn, constexprs = variant.fn, variant.constexprs
    ptr = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if "part" in name or name in variant.fp32_ptrs else ptr
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif re.fullmatch(r"s\w{1,2}d|shk", name):
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if name in ("D", "DG") or re.fullmatch(r"s\w{1,2}[bl]", name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _resources(kernel, target: GPUTarget) -> dict:
    if target.backend == "hip":
        asm = kernel.asm["amdgcn"]
        found = {k: re.search(rf"\.{k}:\s+(\d+)", asm) for k in ("vgpr_count", "vgpr_spill_count", "sgpr_spill_count")}
        return {"regs": int(found["vgpr_count"][1]), "spills": sum(int(m[1]) for k, m in found.items() if "spill" in k)}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {"regs": int(m[1]), "spills": int(m[2])} if m else {}


def compile_variant(variant: Variant, config: triton.Config, target: GPUTarget, dtype: torch.dtype) -> dict:
    """Compile one configuration; returns the LDS bytes, registers and spills (bytes of stack on CUDA)."""
    sig, consts, attrs = _signature(variant, dtype)
    for key, value in config.kwargs.items():
        if key in variant.fn.arg_names:
            sig[key], consts[key] = "constexpr", value
    options = {k: v for k, v in config.kwargs.items() if k not in variant.fn.arg_names}
    options.update(num_warps=config.num_warps, num_stages=config.num_stages)
    kernel = triton.compile(ASTSource(variant.fn, sig, constexprs=consts, attrs=attrs), target=target, options=options)
    return {"lds": kernel.metadata.shared, **_resources(kernel, target)}


def check(targets: list[str], dtype: torch.dtype, first_only: bool, kernels: str = "") -> list[str]:
    """Compile and print; returns the problems found. ``kernels``: only variants whose name starts with it."""
    if tb.is_interpreted(td._direct_fwd_kernel):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    op_bytes = dtype.itemsize
    problems = []
    for target_name in targets:
        target = TARGETS[target_name]
        ttarget = tb.Target(target.backend, target.arch, target.warp_size)
        for variant in (v for v in variants(dtype) if v.name.startswith(kernels)):
            chunk = variant.constexprs.get("CHUNK", tb.MAX_CHUNK)
            configs = tb.kernel_configs(variant.kind, ttarget, op_bytes, max_block_d=64, chunk=chunk)
            _, estimate = tb.CONFIG_BUILDERS[variant.kind]
            if not configs:
                print(f"{target_name} {variant.name}: no configuration fits (the op uses the torch reference)")
            for config in configs[:1] if first_only else configs:
                label = f"{target_name} {variant.name} {config}"
                try:
                    r = compile_variant(variant, config, target, dtype)
                except Exception as e:  # any compiler failure is a finding
                    problems.append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
                    print(f"{label}: FAILED", flush=True)
                    continue
                print(f"{label}: lds {r['lds']} regs {r.get('regs')} spills {r.get('spills')}", flush=True)
                if target.backend == "hip":
                    bound = estimate(config.kwargs, config.num_warps, op_bytes, chunk)
                    if r["lds"] > min(bound, tb.LDS_BYTES_HIP):
                        problems.append(f"{label}: LDS {r['lds']} > estimate {bound} or 64 KB")
                if (op_bytes == 2 or variant.no_spills) and r.get("spills"):
                    problems.append(f"{label}: spills registers ({r['spills']})")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="gfx90a,gfx942,sm90", help=f"comma-separated, of {', '.join(TARGETS)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--first", action="store_true", help="only the default (first) configuration of each kernel")
    p.add_argument("--kernels", default="", help="only kernels whose name starts with this (e.g. li_, toeplitz)")
    args = p.parse_args()
    problems = check(args.targets.split(","), getattr(torch, args.dtype), args.first, args.kernels)
    for problem in problems:
        print("PROBLEM", problem)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

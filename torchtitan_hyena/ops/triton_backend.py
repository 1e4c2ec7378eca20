"""Backend detection and launch configurations for the Triton convolution kernels.

One kernel source serves CUDA, ROCm (HIP) and the CPU interpreter; only the launch configurations differ
(``docs/kernels.md`` §3): AMD wavefronts are 64 wide so ``num_warps <= 16``, LDS is 64 KB, and the AMD-only
compile options (``waves_per_eu``, ``matrix_instr_nonkdim``) are rejected by the CUDA backend (as ``maxnreg`` is
by HIP). The interpreter gets a single configuration: autotuning there would query a GPU driver.

Importing this module (every kernel module does) first checks that the installed Triton is the one the torch build
runs with: ROCm torch wheels bring theirs as ``pytorch-triton-rocm``, and pip installs PyPI's ``triton`` (the build
CUDA wheels pin) over it whenever something requires ``triton``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from torchtitan_hyena.errors import UserError

ROCM_TRITON, CUDA_TRITON = "pytorch-triton-rocm", "triton"


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _torch_pin(dist: str) -> str:
    """The version torch's wheel requires of ``dist`` (``==3.6.0``), or "" when its metadata names none."""
    for requirement in metadata.requires("torch") or []:
        found = re.match(rf"{re.escape(dist)}\s*(==\s*[^;\s]+)", requirement)
        if found:
            return found.group(1).replace(" ", "")
    return ""


def triton_mismatch() -> str | None:
    """Why the installed Triton is not the build this torch runs with (a ROCm torch with PyPI's triton, a CUDA torch
    with pytorch-triton-rocm), naming both versions and the fix; None when they match or torch is a CPU build."""
    if torch.version.hip:
        build, wanted, foreign = f"ROCm build (HIP {torch.version.hip})", ROCM_TRITON, CUDA_TRITON
    elif torch.version.cuda:
        build, wanted, foreign = f"CUDA build ({torch.version.cuda})", CUDA_TRITON, ROCM_TRITON
    else:
        return None
    found = _installed(foreign)
    if found is None:
        return None
    have = _installed(wanted)
    pin = _torch_pin(wanted)
    fix = f"pip uninstall -y {foreign} && pip install --force-reinstall --no-deps '{wanted}{pin}'"
    if wanted == ROCM_TRITON:
        local = torch.__version__.partition("+")[2]
        index = f"nightly/{local}" if ".dev" in torch.__version__ else local
        fix += f" --index-url https://download.pytorch.org/whl/{index or '<the index torch came from>'}"
    over = f" (installed over {wanted} {have})" if have else ""
    return (
        f"torch {torch.__version__} is a {build} but the installed Triton is {foreign} {found}{over}; "
        f"torch.compile and the Triton kernels need {wanted}{pin or ' (the version torch was built with)'}: {fix}"
    )


def require_matching_triton() -> None:
    """Refuse, in one line, a Triton that does not match the torch build (called when the kernels are imported)."""
    problem = triton_mismatch()
    if problem:
        raise UserError(problem)


require_matching_triton()

LDS_BYTES_HIP = 64 * 1024
MAX_CHUNK = 128  # Toeplitz chunk of the 128-tap Hyena-MR filter
MAX_WARPS = {"cuda": 32, "hip": 16, "interpreter": 4}
# Options each backend's compiler accepts besides the kernel's own meta-parameters.
BACKEND_ONLY_OPTIONS = {"hip": ("waves_per_eu", "matrix_instr_nonkdim", "kpack"), "cuda": ("maxnreg",)}


@dataclass(frozen=True)
class Target:
    """Where kernels run: ``backend`` is ``cuda``, ``hip``, ``interpreter`` or ``cpu`` (no driver)."""

    backend: str
    arch: str | int | None = None
    warp_size: int = 32


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (decided once, at decoration)."""
    return isinstance(kernel, InterpretedFunction)


def detect_target(interpreted: bool) -> Target:
    """The active Triton target, or ``cpu`` when no GPU driver exists (``driver.active`` raises there)."""
    if interpreted:
        return Target("interpreter")
    try:
        t = triton.runtime.driver.active.get_current_target()
    except RuntimeError:
        return Target("cpu")
    return Target(t.backend, t.arch, t.warp_size)


# --- LDS (shared memory) estimates, in bytes -------------------------------------------------------------------
# Upper bounds of what one program keeps in LDS at once: dot operands staged for the matrix units, layout
# conversions and cross-warp reduction scratch. ``python -m torchtitan_hyena.ops.triton_aot`` compiles the kernels
# for AMD targets without a GPU and checks these bounds against the compiler's allocation.


def lds_direct(meta: dict, num_warps: int, op_bytes: int, chunk: int) -> int:
    """The fp32 (taps x channels) filter-gradient tile (at most 16 taps) and the cross-warp time reductions."""
    return (16 + num_warps) * meta["BLOCK_D"] * 4


def lds_toeplitz(meta: dict, num_warps: int, op_bytes: int, chunk: int) -> int:
    """One (chunk x chunk) Toeplitz block converted to the dot layout, plus the current and previous input tiles."""
    return chunk * chunk * op_bytes + 2 * chunk * meta["BLOCK_D"] * op_bytes + num_warps * meta["BLOCK_D"] * 4


def lds_filter_grad(meta: dict, num_warps: int, op_bytes: int, chunk: int) -> int:
    """The (ROWS x BLOCK_D) gate tile and the transposed current and previous input tiles."""
    return meta["ROWS"] * meta["BLOCK_D"] * op_bytes + 2 * meta["BLOCK_D"] * chunk * op_bytes


def lds_li_gate(meta: dict, num_warps: int, op_bytes: int, chunk: int) -> int:
    """Two fp32 (BLOCK_T x BLOCK_D) tiles converted between the channel-contiguous activations and the
    time-contiguous FFT buffers, and the cross-warp time reduction of ``dskip``."""
    return 2 * meta["BLOCK_T"] * meta["BLOCK_D"] * 4 + num_warps * meta["BLOCK_D"] * 4


def lds_li_modal(meta: dict, num_warps: int, op_bytes: int, chunk: int) -> int:
    """The cross-warp time reductions of the modal gradient: two fp32 values per channel, mode and warp."""
    return 2 * num_warps * meta["BLOCK_D"] * 16 * 4


def lds_li_spectral(meta: dict, num_warps: int, op_bytes: int, chunk: int) -> int:
    """Re-packing (BLOCK x 2) complex tiles into real and imaginary parts."""
    return 2 * meta["BLOCK"] * 4


# --- configuration lists --------------------------------------------------------------------------------------
# The first entry of each list is the one used without autotuning (deterministic mode). Tiles and warps are chosen
# so that no configuration spills registers on sm90, gfx90a or gfx942 (checked with ``triton_aot``).


def _config(meta: dict, num_warps: int, num_stages: int, **options: int) -> triton.Config:
    return triton.Config({**meta, **options}, num_warps=num_warps, num_stages=num_stages)


def _direct(target: Target, max_block_d: int, chunk: int) -> list[triton.Config]:
    if target.backend == "interpreter":
        return [_config({"BLOCK_T": 64, "BLOCK_D": 32}, 4, 1)]
    if target.backend == "hip":  # (BLOCK_T, BLOCK_D, warps, waves_per_eu)
        tiles = [(64, 64, 4, 0), (64, 64, 8, 2), (32, 64, 4, 0), (32, 128, 8, 2), (128, 64, 8, 2)]
        return [_config({"BLOCK_T": t, "BLOCK_D": d}, w, 1, waves_per_eu=e) for t, d, w, e in tiles]
    tiles = [(64, 64, 8), (64, 64, 4), (32, 64, 4), (32, 128, 8), (64, 128, 8), (128, 64, 8)]
    return [_config({"BLOCK_T": t, "BLOCK_D": d}, w, 1) for t, d, w in tiles]


def _toeplitz(target: Target, max_block_d: int, chunk: int) -> list[triton.Config]:
    if target.backend == "interpreter":
        return [_config({"BLOCK_D": max(16, min(max_block_d, 32))}, 4, 1)]
    blocks = [d for d in (16, 32) if d <= max(16, max_block_d)]  # 64 channels spill registers on sm80/sm90
    if target.backend == "hip":  # 32 x 32 MFMA with 8 warps spills
        return [
            _config({"BLOCK_D": d}, w, 1, waves_per_eu=0, matrix_instr_nonkdim=nk)
            for d in blocks
            for w, nk in [(4, 16), (8, 16), (4, 32)]
            if nk <= d
        ]
    return [_config({"BLOCK_D": d}, w, s) for d in blocks for w, s in [(4, 2), (8, 2), (8, 3)]]


def _filter_grad(target: Target, max_block_d: int, chunk: int) -> list[triton.Config]:
    if target.backend == "interpreter":
        return [_config({"ROWS": min(64, chunk), "BLOCK_D": max(16, min(max_block_d, 32))}, 4, 1)]
    rows = [r for r in (32, 64) if r <= chunk] or [chunk]
    blocks = [d for d in (16, 32) if d <= max(16, max_block_d)]
    if target.backend == "hip":
        return [
            _config({"ROWS": r, "BLOCK_D": d}, w, 1, waves_per_eu=0, matrix_instr_nonkdim=16)
            for r in rows
            for d in blocks
            for w in (4, 8)
        ]
    return [_config({"ROWS": r, "BLOCK_D": d}, 8, 2) for r in rows for d in blocks]  # 4 warps spill on sm90


def _tiles(target: Target, tiles: list[tuple[int, int, int]]) -> list[triton.Config]:
    """(BLOCK_T, BLOCK_D, warps) tiles with the backend's options."""
    options = {"waves_per_eu": 0} if target.backend == "hip" else {}
    return [_config({"BLOCK_T": t, "BLOCK_D": d}, w, 1, **options) for t, d, w in tiles]


def _li_gate(target: Target, max_block_d: int, chunk: int) -> list[triton.Config]:
    if target.backend == "interpreter":
        return [_config({"BLOCK_T": 64, "BLOCK_D": 32}, 4, 1)]
    return _tiles(target, [(64, 32, 4), (128, 32, 8), (64, 64, 8), (32, 64, 4)])


def _li_gate_bwd(target: Target, max_block_d: int, chunk: int) -> list[triton.Config]:
    """Seven live tiles: at most 4 elements of each per thread, or the 64-bit addresses spill registers."""
    if target.backend == "interpreter":
        return [_config({"BLOCK_T": 64, "BLOCK_D": 32}, 4, 1)]
    return _tiles(target, [(32, 32, 4), (64, 32, 8), (32, 64, 8), (16, 64, 4)])


def _li_modal(target: Target, max_block_d: int, chunk: int) -> list[triton.Config]:
    if target.backend == "interpreter":
        return [_config({"BLOCK_T": 64, "BLOCK_D": 16}, 4, 1)]
    return _tiles(target, [(256, 8, 4), (128, 16, 4), (512, 8, 8)])


def _li_spectral(target: Target, max_block_d: int, chunk: int) -> list[triton.Config]:
    """One configuration: these kernels update the spectra in place, and autotuning would re-run them on their own
    output. They stream (8 complex values per thread), so the tile hardly matters."""
    if target.backend == "interpreter":
        return [_config({"BLOCK": 256}, 4, 1)]
    options = {"waves_per_eu": 0} if target.backend == "hip" else {}
    return [_config({"BLOCK": 1024}, 4, 1, **options)]


CONFIG_BUILDERS: dict[str, tuple[Callable[..., list[triton.Config]], Callable[..., int]]] = {
    "direct": (_direct, lds_direct),
    "toeplitz": (_toeplitz, lds_toeplitz),
    "filter_grad": (_filter_grad, lds_filter_grad),
    "li_gate": (_li_gate, lds_li_gate),
    "li_gate_bwd": (_li_gate_bwd, lds_li_gate),
    "li_modal": (_li_modal, lds_li_modal),
    "li_spectral": (_li_spectral, lds_li_spectral),
}


def kernel_configs(
    kind: str, target: Target, op_bytes: int = 2, max_block_d: int = 128, chunk: int = MAX_CHUNK
) -> list[triton.Config]:
    """Launch configurations of kernel family ``kind`` on ``target``: dot operands of ``op_bytes`` bytes, channel
    tiles of at most ``max_block_d`` (beyond 16) and Toeplitz chunks of ``chunk`` rows.

    On HIP, configurations whose LDS estimate exceeds 64 KB are dropped, so the list may be empty."""
    build, lds = CONFIG_BUILDERS[kind]
    configs = build(target, max_block_d, chunk)
    if target.backend == "hip":
        configs = [c for c in configs if lds(c.kwargs, c.num_warps, op_bytes, chunk) <= LDS_BYTES_HIP]
    return configs


def launch_options(config: triton.Config) -> dict:
    """Keyword arguments that launch a plain ``@triton.jit`` kernel with ``config`` (no autotuning)."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


class TunedKernel:
    """A ``@triton.jit`` kernel launched with the configurations of its backend.

    Autotuning happens on GPUs only, per ``key``; under ``torch.use_deterministic_algorithms(True)`` the first
    configuration is always used, so reductions keep one summation order from run to run."""

    def __init__(self, fn: object, kind: str, key: Sequence[str]) -> None:
        self.fn = fn
        self.kind = kind
        self.key = list(key)
        self.interpreted = is_interpreted(fn)
        self._variants: dict[tuple[int, int, int], tuple[list[triton.Config], object | None]] = {}

    def configs(self, op_bytes: int, max_block_d: int = 128, chunk: int = MAX_CHUNK) -> list[triton.Config]:
        """The configurations for this device (see ``kernel_configs``)."""
        variant = (op_bytes, max_block_d, chunk)
        if variant not in self._variants:
            configs = kernel_configs(self.kind, detect_target(self.interpreted), *variant)
            tuned = triton.autotune(configs=configs, key=self.key)(self.fn) if len(configs) > 1 else None
            self._variants[variant] = configs, tuned
        return self._variants[variant][0]

    def launch(
        self, grid: Callable[[dict], tuple[int, ...]], *args, op_bytes: int, max_block_d: int = 128,
        chunk: int = MAX_CHUNK, **kwargs,
    ) -> None:  # fmt: skip
        configs = self.configs(op_bytes, max_block_d, chunk)
        if not configs:
            raise RuntimeError(f"no launch configuration of the {self.kind} kernel fits this device")
        tuned = self._variants[op_bytes, max_block_d, chunk][1]
        if tuned is None or torch.are_deterministic_algorithms_enabled():
            self.fn[grid](*args, **kwargs, **launch_options(configs[0]))
        else:
            tuned[grid](*args, **kwargs)

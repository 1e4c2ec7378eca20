"""Peak dense bf16 FLOP/s per device, for MFU. Unknown devices get None (MFU null), never a guess."""

from __future__ import annotations

import torch

# (substring of the device name, peak bf16 dense FLOP/s per device as torch sees it).
# An MI250X card is two devices (GCDs); each GCD peaks at 191.5 TFLOP/s.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("MI355X", 2500e12),
    ("MI325X", 1307.4e12),
    ("MI300X", 1307.4e12),
    ("MI300A", 980.6e12),
    ("MI250X", 191.5e12),
    ("H200", 989.5e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.5e12),
    ("GH200", 989.5e12),
    ("B200", 2250e12),
    ("A100", 312e12),
)


def peak_flops_for(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def get_peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of ``device``; None on CPU and on devices missing from the table."""
    if device.type != "cuda":
        return None
    return peak_flops_for(device_name(device))

"""Device and cluster profiles for the planner: what one device computes and holds, and how fast its links are.

The defaults are datasheet figures derated to what collective libraries typically reach; they are assumptions,
not measurements. ``--profile FILE`` replaces them with numbers measured on the machine itself: the communication
self-test's JSON (``python -m torchtitan_hyena.tools.comm_check``: bus bandwidth of groups within a node and of
groups spanning nodes), the device self-test's JSON (``python -m torchtitan_hyena.tools.selftest``: achieved MFU),
or a plain JSON object with any :class:`Profile` field.

Bandwidths are nccl-tests "bus bandwidth" per rank (GB/s): the time of a collective moving ``S`` bytes over ``n``
ranks is ``S x factor(n) / busbw`` with factor 2(n-1)/n for all-reduce and (n-1)/n for the others. A group that
spans nodes gets ``inter_node_gbps``: measured with every group of the dimension busy at once, as in training,
so the node's network links are shared by all its devices.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.tools.dry_run import DEVICE_MEMORY_GIB
from torchtitan_hyena.tools.flops import peak_flops_for


@dataclass(frozen=True)
class Profile:
    name: str
    gpus_per_node: int
    memory_gib: float
    peak_tflops: float  # dense bf16 per device
    efficiency: float  # achieved fraction of peak in the model's matmuls and kernels (MFU without communication)
    intra_node_gbps: float  # bus bandwidth per rank, group within one node
    inter_node_gbps: float  # bus bandwidth per rank, group spanning nodes (all devices of a node busy)
    latency_us: float = 20.0  # per collective call
    fp32_slowdown: float = 4.0  # fp32 compute runs this many times slower than bf16 (no bf16 tensor cores)

    @property
    def device_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


def _peak(name: str) -> float:
    flops = peak_flops_for(name)
    assert flops is not None, name
    return flops / 1e12


PROFILES: dict[str, Profile] = {
    # Frontier: 4 MI250X = 8 GCDs per node, Infinity Fabric between GCDs (50-200 GB/s per pair, by pair), 4 x 25 GB/s
    # Slingshot NICs per node = 12.5 GB/s per GCD when all GCDs send; aws-ofi-rccl reaches ~80 % of it.
    "mi250x": Profile("mi250x", 8, DEVICE_MEMORY_GIB["mi250x"], _peak("MI250X"), 0.30, 50.0, 10.0, 30.0),
    # MI300X node: 8 GPUs, 7 x 64 GB/s Infinity Fabric links each; 8 x 400 Gb/s NICs.
    "mi300x": Profile("mi300x", 8, DEVICE_MEMORY_GIB["mi300x"], _peak("MI300X"), 0.35, 300.0, 40.0),
    # H100 / H200 SXM node: NVLink 4 (900 GB/s bidirectional per GPU, ~360 GB/s all-reduce bus bandwidth),
    # 8 x 400 Gb/s InfiniBand NICs.
    "h100": Profile("h100", 8, DEVICE_MEMORY_GIB["h100"], _peak("H100"), 0.40, 360.0, 40.0),
    "h200": Profile("h200", 8, DEVICE_MEMORY_GIB["h200"], _peak("H200"), 0.40, 360.0, 40.0),
}


def load_profile(device: str, path: str | None) -> Profile:
    """The named device's profile with the measured numbers of ``path`` (if given) in place of the defaults."""
    if device not in PROFILES:
        raise ConfigError(f"--device must be one of {', '.join(PROFILES)}, got {device!r}")
    profile = PROFILES[device]
    if not path:
        return profile
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--profile {path}: not readable JSON ({e}); give a comm_check or selftest JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--profile {path}: expected a JSON object")
    return dataclasses.replace(profile, **_measured(data, path))


def _measured(data: dict[str, Any], path: str) -> dict[str, Any]:
    fields = [f.name for f in dataclasses.fields(Profile)]
    out: dict[str, Any] = {}
    for record in data.get("bandwidth", []):  # comm_check: the best bus bandwidth per kind of group
        best = max(record[op]["busbw_gbps"] for op in ("all_reduce", "all_gather", "reduce_scatter"))
        key = "inter_node_gbps" if record["nodes_per_group"] > 1 else "intra_node_gbps"
        out[key] = max(out.get(key, 0.0), best)
    mfus = [r["mfu_pct"] for r in data.get("sections", {}).get("throughput", []) if r.get("mfu_pct")]
    if mfus:  # selftest: the model's achieved MFU on one device
        out["efficiency"] = max(mfus) / 100
    for key, value in data.items():
        if key in fields and key != "name":
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"--profile {path}: {key} must be a positive number, got {value!r}")
            out[key] = value
    if not out:
        raise ConfigError(
            f"--profile {path}: found no measured numbers (a comm_check 'bandwidth' list, a selftest 'throughput' "
            f"section, or any of {', '.join(k for k in fields if k != 'name')})"
        )
    return out

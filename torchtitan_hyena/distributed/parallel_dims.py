"""ParallelDims: degrees of each parallelism, validation, and the device mesh.

Mesh dimensions, outermost first: ``pp, dp_replicate, dp_shard, cp, tp`` (only those > 1 are built; pipeline
stages outermost, as TorchTitan: their point-to-point traffic is the lightest, so it may cross nodes).
Flattened views: ``dp`` (data loading: replicate x shard), ``dp_shard_cp`` (FSDP parameter
sharding: shard x cp, as TorchTitan folds CP into FSDP) and ``dp_cp`` (loss averaging). The flattened
meshes are kept as ``_flatten`` returns them: slicing a flattened name from the root mesh is deprecated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtitan_hyena.config.job_config import Parallelism
from torchtitan_hyena.errors import ConfigError
from torchtitan_hyena.tools.logging import logger


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int
    pp: int = 1
    _mesh: DeviceMesh | None = field(default=None, repr=False)
    _flat: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, parallelism: Parallelism, world_size: int) -> ParallelDims:
        """The degrees of a config's ``[parallelism]`` section on ``world_size`` ranks (validated)."""
        p = parallelism
        return cls(
            dp_replicate=p.data_parallel_replicate_degree,
            dp_shard=p.data_parallel_shard_degree,
            cp=p.context_parallel_degree,
            tp=p.tensor_parallel_degree,
            world_size=world_size,
            pp=p.pipeline_parallel_degree,
        )

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        for name, value in (
            ("data_parallel_replicate_degree", self.dp_replicate),
            ("context_parallel_degree", self.cp),
            ("tensor_parallel_degree", self.tp),
            ("pipeline_parallel_degree", self.pp),
        ):
            if value < 1:
                raise ConfigError(f"parallelism.{name} must be >= 1, got {value}")
        if self.dp_shard == -1:
            rest = self.pp * self.dp_replicate * self.cp * self.tp
            if self.world_size % rest:
                raise ConfigError(
                    f"world size {self.world_size} is not divisible by pipeline_parallel_degree x "
                    f"data_parallel_replicate_degree x context_parallel_degree x tensor_parallel_degree = {rest}; "
                    "adjust the degrees or the rank count"
                )
            self.dp_shard = self.world_size // rest
        if self.dp_shard < 1:
            raise ConfigError(f"parallelism.data_parallel_shard_degree must be -1 or >= 1, got {self.dp_shard}")
        product = self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != self.world_size:
            raise ConfigError(
                f"parallel degrees multiply to {product} (pp {self.pp} x replicate {self.dp_replicate} x shard "
                f"{self.dp_shard} x cp {self.cp} x tp {self.tp}) but the world size is {self.world_size}; they must "
                "be equal"
            )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        # dp_shard stays in the mesh next to dp_replicate even at size 1: HSDP with one shard is how
        # pure replication runs (FSDP2 all-reduces over the replicate dimension).
        degrees = (
            ("pp", self.pp),
            ("dp_replicate", self.dp_replicate),
            ("dp_shard", self.dp_shard),
            ("cp", self.cp),
            ("tp", self.tp),
        )
        dims = [(n, d) for n, d in degrees if d > 1 or (n == "dp_shard" and self.dp_replicate > 1)]
        if not dims:
            dims = [("dp_shard", 1)]
        names = tuple(n for n, _ in dims)
        mesh = init_device_mesh(device_type, tuple(d for _, d in dims), mesh_dim_names=names)
        self._flat = {}
        for alias, parts in self._ALIASES.items():
            present = tuple(d for d in parts if d in names)
            if len(present) > 1:
                self._flat[alias] = mesh[present]._flatten(mesh_dim_name=alias)
        self._mesh = mesh
        logger.info(f"device mesh {dict(dims)} on {device_type}")
        return mesh

    @property
    def world_mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("build_mesh() has not been called")
        return self._mesh

    _ALIASES = {
        "dp": ("dp_replicate", "dp_shard"),
        "dp_shard_cp": ("dp_shard", "cp"),
        "dp_cp": ("dp_replicate", "dp_shard", "cp"),
    }

    def _dim_name(self, name: str) -> str | None:
        """The mesh dimension that realises ``name``: itself, its flattened alias, or its one present part."""
        names = self.world_mesh.mesh_dim_names or ()
        if name not in self._ALIASES:
            return name if name in names else None
        present = [d for d in self._ALIASES[name] if d in names]
        if not present:
            return None
        return present[0] if len(present) == 1 else name

    def get_mesh(self, name: str) -> DeviceMesh | None:
        """The (possibly flattened) sub-mesh ``name``, or None when that dimension is absent (size 1)."""
        dim = self._dim_name(name)
        if dim is None:
            return None
        return self._flat[dim] if dim in self._flat else self.world_mesh[dim]

    def named_meshes(self) -> dict[str, DeviceMesh]:
        """Every 1-D mesh of the layout by name, in the same order on every rank: the mesh dimensions (outermost
        first), the flattened ones, then the dimensions of a 2-D FSDP mesh (HSDP) as ``fsdp.<dim>``."""
        mesh = self.world_mesh
        named = {name: mesh[name] for name in mesh.mesh_dim_names or ()}
        named.update(self._flat)
        fsdp = self.fsdp_mesh()
        if fsdp is not None and fsdp.ndim == 2:
            named.update((f"fsdp.{name}", fsdp[name]) for name in fsdp.mesh_dim_names)
        return {name: m for name, m in named.items() if m.ndim == 1}

    def fsdp_mesh(self) -> DeviceMesh | None:
        """FSDP mesh (dp_shard x cp), or the 2-D HSDP mesh with dp_replicate; None without DP or CP."""
        shard = self._dim_name("dp_shard_cp")
        if shard is None or (self.dp_replicate == 1 and self.dp_shard * self.cp == 1):
            return None
        if self.dp_replicate > 1 and shard in self._flat:
            # (replicate, shard x cp): the flattened dp_cp mesh unflattened into those two dimensions, made once.
            if "hsdp_cp" not in self._flat:
                sizes = (self.dp_replicate, self.dp_shard * self.cp)
                self._flat["hsdp_cp"] = self._flat["dp_cp"]._unflatten(0, sizes, ("dp_replicate", shard))
            return self._flat["hsdp_cp"]
        if self.dp_replicate > 1:
            return self.world_mesh[("dp_replicate", shard)]
        return self.get_mesh(shard)

    @property
    def dp_enabled(self) -> bool:
        return self.dp_replicate * self.dp_shard > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def dp_degree(self) -> int:
        """Number of data-parallel ranks (each reads a different slice of the global batch)."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self) -> int:
        mesh = self.get_mesh("dp")
        return 0 if mesh is None else mesh.get_local_rank()

"""What each mode of the self-test runs: shapes, models and repetitions, all fixed so the run time is bounded."""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan_hyena.tools.conv_bench import OPS


@dataclass(frozen=True)
class Model:
    family: str
    flavor: str
    vocab_size: int

    def args(self, seq_len: int, batch: int, steps: int) -> list[str]:
        """Trainer options selecting this model at ``seq_len``, ``batch`` sequences per step, for ``steps`` steps."""
        return [
            "--model.name", self.family, "--model.flavor", self.flavor, "--model.vocab_size", str(self.vocab_size),
            "--training.seq_len", str(seq_len), "--training.local_batch_size", str(batch),
            "--training.steps", str(steps),
        ]  # fmt: skip

    @property
    def name(self) -> str:
        return f"{self.family} {self.flavor}"


@dataclass(frozen=True)
class Plan:
    # correctness: conv kernels at (batch, length, width); Hyena-LI at li_batch x li_channels per length; attention
    # at (batch, heads, kv heads, length, head dim); compiled-vs-eager fp32 steps of train_models
    conv_shape: tuple[int, int, int]
    li_lengths: tuple[int, ...]
    li_batch: int
    li_channels: int
    attention_shape: tuple[int, int, int, int, int]
    train_models: tuple[Model, ...]
    train_seq_len: int
    train_steps: int
    train_rtol: float
    compile_backend: str
    # kernel speed (bf16, batch 1): operators at width speed_dim, the LI conv at the same width
    speed_ops: tuple[str, ...]
    speed_dim: int
    speed_lengths: tuple[int, ...]
    li_speed_lengths: tuple[int, ...]
    timer_reps: int  # CPU only (do_bench chooses its own repetitions on GPUs): timed and untimed calls
    timer_warmup: int
    # model throughput: one sequence of seq_len per device and step, per model and activation-checkpointing mode
    models: tuple[Model, ...]
    seq_len: int
    dtype: str
    ac_modes: tuple[str, ...]
    compile_throughput: bool
    warmup_steps: int
    timed_steps: int
    # communication (launches with several ranks)
    comm_sizes_mib: tuple[float, ...] = (1, 16, 256)
    comm_iters: int = 10


FULL_SIZE = (Model("llama3", "1B", 128256), Model("hyena", "evo2_1b", 512))
DEBUG = (Model("llama3", "debugmodel", 256), Model("hyena", "debugmodel", 256))

PLANS = {
    "full": Plan(
        conv_shape=(2, 3000, 512), li_lengths=(1000, 4096, 8192), li_batch=2, li_channels=64,
        attention_shape=(2, 16, 4, 2048, 128), train_models=DEBUG, train_seq_len=512, train_steps=3,
        train_rtol=1e-3, compile_backend="inductor", speed_ops=tuple(OPS), speed_dim=4096,
        speed_lengths=(8192, 32768), li_speed_lengths=(8192, 32768, 131072), timer_reps=5, timer_warmup=1,
        models=FULL_SIZE, seq_len=8192, dtype="bfloat16", ac_modes=("none", "full"), compile_throughput=True,
        warmup_steps=3, timed_steps=5,
    ),
    "quick": Plan(
        conv_shape=(2, 3000, 512), li_lengths=(1000, 4096), li_batch=2, li_channels=64,
        attention_shape=(2, 16, 4, 2048, 128), train_models=DEBUG, train_seq_len=256, train_steps=2,
        train_rtol=1e-3, compile_backend="inductor", speed_ops=tuple(OPS), speed_dim=4096, speed_lengths=(8192,),
        li_speed_lengths=(8192,), timer_reps=5, timer_warmup=1, models=FULL_SIZE, seq_len=8192, dtype="bfloat16",
        ac_modes=("full",), compile_throughput=True, warmup_steps=2, timed_steps=3,
    ),
    # CPU, kernels under the Triton interpreter, sized for the test suite: each part runs once, on the smallest
    # shapes that still cross the kernels' tile and chunk boundaries. Compiling costs minutes with Inductor on CPU
    # and 10-15 s with aot_eager, so the compiled steps use the eager backend (Dynamo's graph capture, the custom ops'
    # fake kernels and guards; no AOT autograd, no code generation) on the hybrid alone (its Hyena ops are what
    # capture can break); throughput runs eager in fp32 (CPUs are slow in bf16); the speed rows time one call of the
    # MR kernel. The numbers check the code path, not speed.
    "smoke": Plan(
        conv_shape=(1, 150, 32), li_lengths=(24, 37), li_batch=1, li_channels=3,
        attention_shape=(1, 2, 1, 16, 8), train_models=DEBUG[1:], train_seq_len=64, train_steps=2,
        train_rtol=1e-4, compile_backend="eager", speed_ops=("mr",), speed_dim=16, speed_lengths=(32,),
        li_speed_lengths=(32,), timer_reps=1, timer_warmup=0, models=DEBUG, seq_len=64, dtype="float32",
        ac_modes=("full",), compile_throughput=False, warmup_steps=1, timed_steps=1, comm_sizes_mib=(0.0625,),
        comm_iters=2,
    ),
}  # fmt: skip

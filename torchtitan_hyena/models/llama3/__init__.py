"""Llama 3: flavors and the TrainSpec."""

from torchtitan_hyena.components.dataloader import build_dataloader
from torchtitan_hyena.components.loss import build_cross_entropy_loss
from torchtitan_hyena.components.lr_scheduler import build_lr_schedulers
from torchtitan_hyena.components.optimizer import build_optimizers
from torchtitan_hyena.components.tokenizers import build_tokenizer
from torchtitan_hyena.models.llama3.args import Llama3Args
from torchtitan_hyena.models.llama3.model import Transformer
from torchtitan_hyena.models.llama3.parallelize import parallelize_llama, validate_llama_parallelism
from torchtitan_hyena.protocols.train_spec import TrainSpec, register_train_spec

# gpt-neuro's flavors (1B, 8B) and Meta's 70B; vocab and max_seq_len come from the job config.
llama3_flavors = {
    "debugmodel": Llama3Args(dim=256, n_layers=6, n_heads=16, n_kv_heads=4, vocab_size=256, rope_theta=500000),
    "1B": Llama3Args(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024),
    "8B": Llama3Args(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024),
    "70B": Llama3Args(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
}

register_train_spec(
    TrainSpec(
        name="llama3",
        model_cls=Transformer,
        model_args=llama3_flavors,
        parallelize_fn=parallelize_llama,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        validate_fn=validate_llama_parallelism,
    )
)

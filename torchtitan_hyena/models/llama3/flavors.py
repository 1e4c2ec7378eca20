"""Llama 3 flavors: gpt-neuro's (1B, 8B) and Meta's 70B; vocab and max_seq_len come from the job config."""

from torchtitan_hyena.models.llama3.args import Llama3Args

llama3_flavors = {
    "debugmodel": Llama3Args(dim=256, n_layers=6, n_heads=16, n_kv_heads=4, vocab_size=256, rope_theta=500000),
    "1B": Llama3Args(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024),
    "8B": Llama3Args(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024),
    "70B": Llama3Args(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
}

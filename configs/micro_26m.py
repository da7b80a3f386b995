"""A 26M LLaMA-style model with a small vocabulary (the MiniMind2-small shape): 8 layers x 512,
8 query / 2 kv heads, RoPE theta 1e6, SwiGLU at 8/3 d rounded up to 64 (1408), RMSNorm,
tied embeddings, vocabulary 6400."""
from configs.base import Config, ModelConfig

config = Config(
    model=ModelConfig(
        vocab_size=6400, seq_len=512,
        n_layers=8, d_model=512, n_heads=8, n_kv_heads=2, rope_theta=1e6,
        norm="rmsnorm", pos="rope", mlp="swiglu", d_ff_rule="8/3", d_ff_multiple=64,
        tie_embeddings=True,
    ),
)

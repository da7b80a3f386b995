"""GPT-2 small (Radford et al., 2019): 12 layers x 768, learned positions, LayerNorm with bias,
biased linears, GELU (tanh), tied embeddings; vocabulary 50257 padded to 50304 (a multiple of
64) for faster matmuls. With model.vocab_multiple=1 it has GPT-2's 124,439,808 parameters."""
from configs.base import Config, DataConfig, ModelConfig

config = Config(
    model=ModelConfig(
        vocab_size=50257, vocab_multiple=64, seq_len=1024,
        n_layers=12, d_model=768, n_heads=12,
        norm="layernorm", norm_bias=True, pos="learned",
        attn_bias=True, mlp="gelu_tanh", mlp_bias=True, tie_embeddings=True,
    ),
    data=DataConfig(path="data/fineweb10B"),
)

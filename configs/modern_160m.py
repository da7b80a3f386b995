"""The recipe of the fastest small-model speedruns (modded-nanogpt): 16 layers x 768, 8 query and
4 kv heads with QK-norm and RoPE, ReLU^2 MLP at 4x, parameter-free RMSNorm, untied embeddings,
logit soft-cap 15, vocabulary 50304, context 2048."""
from configs.base import Config, DataConfig, ModelConfig

config = Config(
    model=ModelConfig(
        vocab_size=50304, seq_len=2048,
        n_layers=16, d_model=768, n_heads=8, n_kv_heads=4, qk_norm=True,
        norm="rmsnorm", norm_scale=False, pos="rope",
        mlp="relu2", d_ff_rule="4x", tie_embeddings=False, logit_softcap=15.0,
    ),
    data=DataConfig(path="data/fineweb10B"),
)

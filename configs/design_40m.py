"""A 40M design (35,763,840 parameters) for short, data-rich runs: 16 layers x 320, 5 heads of 64,
SwiGLU (hidden 854 ~ 8/3 d), pre-norm RMSNorm, RoPE, no biases, tied GPT-2 embeddings.
Depth over width at this size follows MobileLLM (Liu et al., 2024); the recipe is LLaMA's
(Touvron et al., 2023). See notes/architecture.md."""
from configs.base import Config, DataConfig, ModelConfig

config = Config(
    model=ModelConfig(
        vocab_size=50257, seq_len=1024,
        n_layers=16, d_model=320, n_heads=5,
        norm="rmsnorm", pos="rope", mlp="swiglu", d_ff=854, tie_embeddings=True,
    ),
    data=DataConfig(path="data/fineweb10B"),
)

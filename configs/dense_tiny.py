"""The dense baseline of configs/moe_tiny.py: the same 4 x 256 byte-level model and training,
with one SwiGLU MLP of 704 per layer, the active expert width of moe_tiny's top-2 of 8 experts of
352 (moe_tiny adds only its routers, 256 x 8 per layer). notes/moe.md compares the two."""
from configs.base import Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig

config = Config(
    model=ModelConfig(
        vocab_size=257, vocab_multiple=64, seq_len=256,
        n_layers=4, d_model=256, n_heads=4, d_ff=704,
        norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=True,
    ),
    data=DataConfig(path="data/stdlib", val_tokens=32_768),
    optim=OptimConfig(lr=2e-3, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1),
    train=TrainConfig(steps=120, batch_size=8, log_every=5, ckpt_every=120),
    eval=EvalConfig(every=40),
)

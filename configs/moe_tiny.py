"""A tiny mixture of experts for the offline stdlib corpus on a 2-core CPU: the quickstart's
4 x 256 byte-level model with every MLP replaced by 8 SwiGLU experts of 352 (half the dense 704),
top-2 routed. Each token uses 2 x 352 = 704 expert units, as configs/dense_tiny.py's one MLP of
704 (plus a 256 x 8 router per layer); the model holds 4x the MLP parameters. Capacity 1.25, not
dropless: on a CPU jax.lax.ragged_dot computes every expert on every row, 2.5x slower per step
(notes/moe.md); `model.capacity_factor=none` runs dropless. notes/moe.md compares the two presets."""
from configs.base import Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig

config = Config(
    model=ModelConfig(
        vocab_size=257, vocab_multiple=64, seq_len=256,
        n_layers=4, d_model=256, n_heads=4,
        norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=True,
        n_experts=8, top_k=2, expert_ff=352, capacity_factor=1.25, aux_loss=0.01, router_z_loss=0.001,
    ),
    data=DataConfig(path="data/stdlib", val_tokens=32_768),
    optim=OptimConfig(lr=2e-3, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1),
    train=TrainConfig(steps=120, batch_size=8, log_every=5, ckpt_every=120),
    eval=EvalConfig(every=40),
)

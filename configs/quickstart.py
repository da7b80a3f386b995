"""A 3M-parameter model that trains in minutes on a 2-core CPU, on the offline stdlib corpus
(`python corpus.py prepare --input stdlib --tokenizer bytes --out data/stdlib`): byte-level
vocabulary (256 bytes + end-of-text) padded to 320, 4 layers x 256, RoPE, SwiGLU, tied."""
from configs.base import Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig

config = Config(
    model=ModelConfig(
        vocab_size=257, vocab_multiple=64, seq_len=256,
        n_layers=4, d_model=256, n_heads=4,
        norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=True,
    ),
    data=DataConfig(path="data/stdlib", val_tokens=65_536),
    optim=OptimConfig(lr=2e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1),
    train=TrainConfig(steps=500, batch_size=16, log_every=25, ckpt_every=100),
    eval=EvalConfig(every=100),
)

"""A 3M-parameter model that trains in minutes on a 2-core CPU, on the offline stdlib corpus
(`python data.py prepare --input stdlib --tokenizer bytes --out data/stdlib`): byte-level
vocabulary (256 bytes + end-of-text) padded to 320, 4 layers x 256, RoPE, SwiGLU, tied."""
from configs.base import Config, DataConfig, ModelConfig, TrainConfig

config = Config(
    model=ModelConfig(
        vocab_size=257, vocab_multiple=64, seq_len=256,
        n_layers=4, d_model=256, n_heads=4,
        norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=True,
    ),
    data=DataConfig(path="data/stdlib"),
    train=TrainConfig(steps=300, batch_size=16, log_every=10, eval_every=100, ckpt_every=100),
)

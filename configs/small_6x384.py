"""A 10.9M GPT in the shape of nanoGPT's character-level Shakespeare model (6 layers x 384, 6 heads
of 64, context 256): learned positions, LayerNorm with bias, biased linears, GELU MLP at 4x, tied
embeddings, on the byte vocabulary (256 bytes + end-of-text) padded to 320 like configs/quickstart.py.
The CPU suite of `bench.py train` times it against the PyTorch twin."""
from configs.base import Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig

config = Config(
    model=ModelConfig(
        vocab_size=257, vocab_multiple=64, seq_len=256,
        n_layers=6, d_model=384, n_heads=6,
        norm="layernorm", norm_bias=True, pos="learned",
        attn_bias=True, mlp="gelu", mlp_bias=True, tie_embeddings=True,
    ),
    data=DataConfig(path="data/stdlib", val_tokens=65_536),
    optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1),
    train=TrainConfig(steps=2000, batch_size=16, log_every=50, ckpt_every=500),
    eval=EvalConfig(every=250),
)

"""What every study shares: the quickstart preset (4 x 256, byte-level stdlib corpus) trained for
150 steps of 16 x 256 tokens (614K tokens, a few CPU minutes per cell), one seed per cell; the
seed spread is measured once, on the base cell (studies/seeds.py). Add seeds here where a gap is
within that spread: finished cells are skipped, so only the new seeds train."""
BASE = "configs/quickstart.py"
BUDGET = ("train.steps=150", "optim.warmup_steps=30", "eval.every=50", "train.ckpt_every=50",
          "train.log_every=10")
SEEDS = (0,)

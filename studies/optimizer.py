"""AdamW vs Muon, each at its own tuned learning rate: AdamW's sweep is studies/lr.py (its base
2e-3 is repeated here); Muon's hidden-matrix lr is swept over 0.01-0.08, with AdamW 2e-3 on the
embedding, unembedding and scalars."""
from ablate import Study
from studies.common import BASE, BUDGET, SEEDS

MUON = ("optim.name=muon", "optim.embed_lr=2e-3", "optim.unembed_lr=2e-3", "optim.scalar_lr=2e-3")

study = Study(name="optimizer", base=BASE, common=BUDGET, seeds=SEEDS,
              claim="Muon beats AdamW per token at its own lr (Jordan et al., 2024)",
              cells={"adamw": (), **{f"muon-lr{lr}": MUON + (f"optim.lr={lr}",) for lr in ("0.01", "0.02", "0.04", "0.08")}})

"""AdamW (lr 2e-3) vs Muon on the hidden matrices (lr 0.02, AdamW 2e-3 on the rest)."""
from ablate import Study
from studies.common import BASE, BUDGET, SEEDS

study = Study(name="optimizer", base=BASE, common=BUDGET, seeds=SEEDS,
              claim="Muon beats AdamW per token at its own lr (Jordan et al., 2024)",
              cells={"adamw": (),
                     "muon": ("optim.name=muon", "optim.lr=0.02", "optim.embed_lr=2e-3",
                              "optim.unembed_lr=2e-3", "optim.scalar_lr=2e-3")})

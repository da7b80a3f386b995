"""Tied vs untied embeddings at equal total parameters (untied: d_ff 677, 3.29M vs 3.30M)."""
from ablate import Study
from studies.common import BASE, BUDGET, SEEDS

study = Study(name="tied", base=BASE, common=BUDGET, seeds=SEEDS,
              claim="tying embeddings is free or helps at small scale (Press & Wolf, 2017)",
              cells={"tied": (), "untied": ("model.tie_embeddings=false", "model.d_ff=677")})

"""RMSNorm vs LayerNorm (notes/architecture.md: RMSNorm matches LayerNorm at lower cost)."""
from ablate import Study
from studies.common import BASE, BUDGET, SEEDS

study = Study(name="norms", base=BASE, common=BUDGET, seeds=SEEDS,
              claim="RMSNorm matches LayerNorm quality (Zhang & Sennrich, 2019)",
              cells={"rmsnorm": (), "layernorm": ("model.norm=layernorm", "model.norm_bias=true")})

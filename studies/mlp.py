"""SwiGLU (8/3 d) vs SiLU (4 d) vs GELU (4 d): 3.30M, 3.23M and 3.23M parameters."""
from ablate import Study
from studies.common import BASE, BUDGET, SEEDS

study = Study(name="mlp", base=BASE, common=BUDGET, seeds=SEEDS,
              claim="GLU variants beat plain activations at equal parameters (Shazeer, 2020)",
              cells={"swiglu": (), "silu-4x": ("model.mlp=silu",), "gelu-4x": ("model.mlp=gelu",)})

"""Depth vs width at ~3.2M parameters: 2 x 352 (3.13M), 4 x 256 (3.30M), 8 x 176 (3.21M)."""
from ablate import Study
from studies.common import BASE, BUDGET, SEEDS

study = Study(name="depth_width", base=BASE, common=BUDGET, seeds=SEEDS,
              claim="deeper and thinner wins at a fixed parameter budget (MobileLLM, Liu et al., 2024)",
              cells={"2x352": ("model.n_layers=2", "model.d_model=352"),
                     "4x256": (),
                     "8x176": ("model.n_layers=8", "model.d_model=176")})

"""RoPE vs NoPE vs learned absolute positions."""
from ablate import Study
from studies.common import BASE, BUDGET, SEEDS

study = Study(name="positions", base=BASE, common=BUDGET, seeds=SEEDS,
              claim="RoPE beats learned positions; NoPE trains but lags (Su et al., 2021; Kazemnejad et al., 2023)",
              cells={"rope": (), "nope": ("model.pos=none",), "learned": ("model.pos=learned",)})

"""Pre- vs post-norm, and post-norm at a 5x lower learning rate (the seed system's finding)."""
from ablate import Study
from studies.common import BASE, BUDGET, SEEDS

study = Study(name="norm_position", base=BASE, common=BUDGET, seeds=SEEDS,
              claim="pre-norm trains stably at a higher lr; post-norm needs ~5x lower (Xiong et al., 2020)",
              cells={"pre": (), "post": ("model.norm_position=post",),
                     "post-lr4e-4": ("model.norm_position=post", "optim.lr=4e-4")})

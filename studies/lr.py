"""Learning rate: 5 log-spaced values around the quickstart's 2e-3."""
from ablate import Study
from studies.common import BASE, BUDGET, SEEDS

study = Study(name="lr", base=BASE, common=BUDGET, seeds=SEEDS,
              claim="the quickstart's lr 2e-3 is near the best at this budget",
              cells={f"lr{lr}": (f"optim.lr={lr}",) for lr in ("5e-4", "1e-3", "2e-3", "4e-3", "8e-3")})

"""Batch size at equal tokens (614K): 8, 16 and 32 sequences of 256, the same lr."""
from ablate import Study
from studies.common import BASE, BUDGET, SEEDS

study = Study(name="batch", base=BASE, common=BUDGET, seeds=SEEDS, tokens=16 * 256 * 150,
              claim="at a fixed token budget, smaller batches (more steps) win below the critical batch size",
              cells={f"b{b}": (f"train.batch_size={b}",) for b in (8, 16, 32)})

"""KV heads 1 (MQA), 2 (GQA) and 4 (MHA) of 4 query heads."""
from ablate import Study
from studies.common import BASE, BUDGET, SEEDS

study = Study(name="kv_heads", base=BASE, common=BUDGET, seeds=SEEDS,
              claim="GQA loses little against MHA (Ainslie et al., 2023)",
              cells={f"kv{k}": (f"model.n_kv_heads={k}",) for k in (1, 2, 4)})

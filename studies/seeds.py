"""The seed spread of the base cell: the yardstick every study's gap is read against."""
from ablate import Study
from studies.common import BASE, BUDGET

study = Study(name="seeds", base=BASE, common=BUDGET, seeds=(0, 1, 2),
              claim="the spread of final val loss over seeds (init and data order) at this budget",
              cells={"base": ()})

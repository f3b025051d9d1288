"""Hyperparameter sweeps over training runs with optuna (launch/sweep.py is the command).

`space` parses `--space=KEY=DIST(...)` into optuna distributions; `runner` runs each trial
as a normal `launch/train.py` run in its own workdir (one after another, or several at once
on disjoint device subsets), reports its eval metric to optuna as it is logged and prunes
it early; `report` writes sweep.md, the plot and the best config.
"""

from jaxtune.sweep import report
from jaxtune.sweep import runner
from jaxtune.sweep import space

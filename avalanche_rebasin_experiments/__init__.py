"""The continual-learning comparison harness (imports Avalanche; the core does not).

``avalanche-rebasin-compare`` / ``python -m avalanche_rebasin_experiments`` runs it;
:mod:`.benchmarks` and :mod:`.strategies` are its registries (one entry per benchmark or
strategy), :mod:`.runner` runs one (strategy, seed), :mod:`.sweep` a whole grid, and
:mod:`.reporting` writes the tables, CSV and plots.
"""

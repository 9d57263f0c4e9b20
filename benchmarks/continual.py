"""Continual-learning comparison: Re-basin against Avalanche's baselines.

The program lives in the package (``avalanche_rebasin_experiments``, also installed as the
``avalanche-rebasin-compare`` command); this script runs it from a checkout:

    python benchmarks/continual.py --quick
    python benchmarks/continual.py --help
"""

from avalanche_rebasin_experiments.cli import main

if __name__ == "__main__":
    main()

"""runner: a Hydra-configured experiment runner for PyTorch.

Importing this package is cheap on purpose: torch and friends load only when a job runs,
so ``python -m runner --help`` and ``--cfg job`` answer without paying for them.
"""

__version__ = "0.1.0"


def train(overrides=(), config_dir=None, output_dir=None):
    """Train one job from Python or a notebook; see runner.api.train."""
    from runner.api import train as _train

    return _train(overrides, config_dir=config_dir, output_dir=output_dir)

"""Ready-to-run examples: a data module and a model small enough to prune on a laptop CPU.

These are what ``examples/digits_snip.yaml`` refers to::

    lightning-prune fit --config examples/digits_snip.yaml

They need the ``examples`` extra (``pip install lightning-prune[examples]``) for scikit-learn's bundled
digits data set; nothing is downloaded.
"""

from lightning_prune.examples.digits import DigitsClassifier, DigitsDataModule

__all__ = ["DigitsClassifier", "DigitsDataModule"]

"""Ready-to-run examples: data modules and classifiers the YAML configs under ``examples/`` refer to.

- ``DigitsDataModule``/``DigitsClassifier``: scikit-learn's bundled 8×8 digits, nothing downloaded (the
  main job: ``lightning-prune fit --config examples/digits_snip.yaml``);
- ``MNISTDataModule``/``MNISTClassifier``: MNIST and the LeNets of the SNIP paper;
- ``CIFAR10DataModule``, ``CIFAR100DataModule``, ``ImagenetteDataModule``: torchvision's data sets
  (downloaded on first use), and ``ImageClassifier``, a classifier over any model of
  :func:`lightning_prune.models.create_model`.

They need the ``examples`` extra (``pip install lightning-prune[examples]``).
"""

from lightning_prune.examples.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_prune.examples.classifier import ImageClassifier
from lightning_prune.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_prune.examples.imagenette import ImagenetteDataModule
from lightning_prune.examples.mnist import LeNet5Caffe, LeNet300100, MNISTClassifier, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsClassifier",
    "DigitsDataModule",
    "ImageClassifier",
    "ImagenetteDataModule",
    "LeNet5Caffe",
    "LeNet300100",
    "MNISTClassifier",
    "MNISTDataModule",
]

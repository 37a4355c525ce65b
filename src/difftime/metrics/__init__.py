"""Sample-quality metrics: one entry point, :func:`quality_metrics`.

Metrics (all compare samples against a reference split of the dataset):

=======  ====================================================================  ===============
name     what                                                                  data
=======  ====================================================================  ===============
fid      Frechet distance on Inception-v3 pool3 features (TF-FID network)       images
fd       Frechet distance on the penultimate layer of a small trained CNN       digits, mnist,
                                                                               fashion-mnist
kid      kernel (polynomial MMD^2) distance, mean and std over subsets          images
pr       improved precision / recall, k = 3 nearest-neighbour manifolds         images
mmd      unbiased MMD^2, RBF kernel with the median-heuristic bandwidth         vectors
swd      sliced Wasserstein-1 over seeded random directions                     vectors
=======  ====================================================================  ===============

``kid`` and ``pr`` run on the classifier features where a classifier was trained for the
dataset and on Inception features otherwise (``features=`` overrides); every result records
its feature extractor's name and sha256. Reference features are cached on disk (see
:func:`difftime.metrics.features.cache_dir`).

Samples are in DATA space: integer levels with the dataset's image shape (decode model output
with ``dataset.scaler.decode`` first), or raw float vectors for vector data.
"""

from __future__ import annotations

from difftime.metrics.classifier import CLASSIFIER_DATASETS, ClassifierFeatures, load_classifier
from difftime.metrics.features import frechet_distance, kernel_inception_distance, precision_recall
from difftime.metrics.inception import InceptionFeatures
from difftime.metrics.lowdim import mmd_rbf, sliced_wasserstein
from difftime.metrics.quality import (
    IMAGE_METRICS,
    METRICS,
    PR_K,
    REFERENCE_SUBSET_SEED,
    SWD_PROJECTIONS,
    VECTOR_METRICS,
    quality_metrics,
)

__all__ = [
    "CLASSIFIER_DATASETS",
    "IMAGE_METRICS",
    "METRICS",
    "PR_K",
    "REFERENCE_SUBSET_SEED",
    "SWD_PROJECTIONS",
    "VECTOR_METRICS",
    "ClassifierFeatures",
    "InceptionFeatures",
    "frechet_distance",
    "kernel_inception_distance",
    "load_classifier",
    "mmd_rbf",
    "precision_recall",
    "quality_metrics",
    "sliced_wasserstein",
]

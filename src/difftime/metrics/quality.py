"""``quality_metrics``: sample quality against a reference split, one entry point for every metric of
:mod:`difftime.metrics`; each feature extractor runs once and reference features are cached."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difftime import distributed
from difftime.errors import DifftimeError
from difftime.metrics.classifier import CLASSIFIER_DATASETS, load_classifier
from difftime.metrics.features import (
    bootstrap_counts,
    frechet_bootstrap,
    frechet_distance_features,
    kernel_inception_distance,
    kid_bootstrap,
    precision_recall,
    reference_features,
)
from difftime.metrics.inception import InceptionFeatures
from difftime.metrics.lowdim import mmd_rbf, sliced_wasserstein

IMAGE_METRICS = ("fid", "fd", "kid", "pr")
VECTOR_METRICS = ("mmd", "swd")
METRICS = IMAGE_METRICS + VECTOR_METRICS
PR_K = 3
SWD_PROJECTIONS = 512
# The reference subset, when n_reference is smaller than the split: the first n of a fixed
# permutation, so a given (spec, split, n) always means the same images (and one cache entry).
REFERENCE_SUBSET_SEED = 0


def _samples_array(samples: Any, spec: str, shape: tuple[int, ...], levels: int | None) -> Tensor:
    if isinstance(samples, np.ndarray):
        if samples.dtype.kind not in "biuf":
            raise DifftimeError(f"samples have dtype {samples.dtype}; expected integer levels or real numbers")
        t = torch.from_numpy(np.array(samples, copy=True))
    elif isinstance(samples, Tensor):
        t = samples.detach().cpu()
    else:
        raise DifftimeError(f"samples are a {type(samples).__name__}; expected a numpy array or torch tensor")
    if tuple(t.shape[1:]) != shape or t.dim() != len(shape) + 1:
        raise DifftimeError(
            f"samples have shape {tuple(t.shape)}; {spec} data has shape (N, {', '.join(map(str, shape))})"
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise DifftimeError(f"samples are {t.dtype}; expected real numbers")
    if levels is None:
        t = t.to(torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise DifftimeError("samples hold NaN or infinite values; expected finite data-space vectors")
        return t
    k = t.to(torch.float64)
    if t.is_floating_point() and not bool(torch.all(torch.isfinite(k) & (k == torch.floor(k)))):
        raise DifftimeError(
            f"samples are non-integer {t.dtype} values; expected data-space integer levels 0..{levels - 1} "
            "(decode model-space samples with dataset.scaler.decode first)"
        )
    if k.numel() and (float(k.min()) < 0 or float(k.max()) > levels - 1):
        raise DifftimeError(
            f"sample levels range over [{float(k.min()):g}, {float(k.max()):g}]; expected 0..{levels - 1}"
        )
    return t.to(torch.uint8 if levels <= 256 else torch.int64)


def _replicates(reps: np.ndarray, seed: int) -> dict[str, Any]:
    return {"se": float(np.std(reps, ddof=1)), "bootstrap": len(reps), "bootstrap_seed": seed,
            "replicates": [float(v) for v in reps]}


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    out = tuple(metrics)
    unknown = [m for m in out if m not in METRICS]
    if unknown or not out:
        raise DifftimeError(f"unknown metrics {unknown or '(none given)'}; expected some of {', '.join(METRICS)}")
    if len(set(out)) != len(out):
        raise DifftimeError(f"metrics {list(out)} repeat a name; expected each at most once")
    return out


def _extractor_record(ex: Any) -> dict[str, Any]:
    rec = {"extractor": ex.name, "extractor_sha256": ex.sha256, "feature_dim": int(ex.feature_dim)}
    if isinstance(ex, InceptionFeatures):
        rec["preprocess"] = ex.preprocess
    return rec


def _extract(ex: Any, images: Tensor, shard: bool, progress: bool, desc: str) -> np.ndarray:
    """``ex.extract(images)``; with ``shard`` its batches dealt to torchrun's ranks (each batch the
    one a single process computes, so the features are the same) and gathered on every rank."""
    if not shard or distributed.world_size() == 1:
        return ex.extract(images, progress=progress, desc=desc)
    size = ex.BATCH_SIZE
    starts = range(0, len(images), size)
    return np.concatenate(distributed.deal(len(starts), lambda k: ex.extract(images[starts[k]:starts[k] + size],
                                                                              progress=False)))


def quality_metrics(
    samples: np.ndarray | Tensor,
    dataset_spec: str,
    metrics: Sequence[str],
    *,
    reference_split: str = "test",
    n_reference: int | None = None,
    seed: int = 0,
    progress: bool = True,
    features: str = "auto",
    inception_path: str | None = None,
    use_cache: bool = True,
    bootstrap: int = 0,
    shard: bool = False,
) -> dict[str, Any]:
    """Compare data-space ``samples`` with the ``reference_split`` of ``dataset_spec``.

    Returns ``{"dataset", "reference_split", "n_samples", "n_reference", "reference_subset",
    <metric>: {...}}`` where each metric entry holds ``value`` (and ``std`` for kid, ``se`` for
    swd; ``precision``/``recall`` for pr) plus the extractor name, sha256 and feature dim for
    feature-based metrics. ``seed`` drives KID subsets, SWD directions and the MMD bandwidth
    subsample. ``features`` ("auto", "classifier" or "inception") picks the feature space of
    kid and pr; "auto" is the classifier where one is trained, Inception otherwise.

    ``bootstrap`` > 0 adds, to fd/fid and kid, that many bootstrap ``replicates`` (the samples
    resampled with ``bootstrap_counts(n, bootstrap, seed)``, the reference fixed) and their sd as
    ``se``; kid's value is then the full U-statistic over all pairs. The counts depend only on
    (n, bootstrap, seed), so two sample sets whose rows share x_T seeds get paired replicates, and
    ``difftime.stats.replicate_difference`` turns two entries into a paired interval. With
    ``shard`` under torchrun, every rank calls this with the same arguments and the feature
    extraction's batches are dealt to the ranks: the same features, and the same result on every rank.

    ``samples`` are data-space: integer levels (N, C, H, W) for images (``dataset.scaler.decode``
    of model-space samples), real vectors (N, d) otherwise. ``metrics`` names some of ``METRICS``:
    "fid", "fd" (Frechet distance on a trained classifier's features), "kid" and "pr" for images,
    "mmd" and "swd" for vectors. ``n_reference`` takes a fixed subset of the split, ``use_cache``
    keeps reference features on disk and ``inception_path`` points at the FID network. Bad input
    raises DifftimeError. References: FID, https://arxiv.org/abs/1706.08500; KID,
    https://arxiv.org/abs/1801.01401; precision and recall, https://arxiv.org/abs/1904.06991.

    >>> import difftime as dt
    >>> spec = "toy:moons:n=200,n_test=50"
    >>> samples = dt.load_data(spec).train[:100].numpy()   # real data standing in for samples
    >>> out = dt.quality_metrics(samples, spec, ["mmd", "swd"], progress=False)
    >>> out["n_samples"], out["n_reference"], out["reference_split"]
    (100, 50, 'test')
    >>> abs(out["mmd"]["value"]) < 0.05, out["swd"]["n_projections"]
    (True, 512)
    """
    from difftime.data import load_data

    chosen = _check_metrics(metrics)
    if reference_split not in ("train", "test"):
        raise DifftimeError(f"reference_split={reference_split!r}; expected 'train' or 'test'")
    if features not in ("auto", "classifier", "inception"):
        raise DifftimeError(f"features={features!r}; expected 'auto', 'classifier' or 'inception'")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DifftimeError(f"seed={seed!r}; expected an integer >= 0")
    data = load_data(dataset_spec)
    is_image = data.is_image and data.scaler.discrete
    wrong = [m for m in chosen if (m in VECTOR_METRICS) == is_image]
    if wrong:
        if is_image:
            raise DifftimeError(
                f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} for low-dimensional vector data, and "
                f"{dataset_spec} holds images; use some of {', '.join(IMAGE_METRICS)}"
            )
        raise DifftimeError(
            f"{', '.join(wrong)} {'needs' if len(wrong) == 1 else 'need'} image features, and {dataset_spec} holds "
            f"vectors of shape {data.shape}; use some of {', '.join(VECTOR_METRICS)}"
        )
    has_classifier = dataset_spec in CLASSIFIER_DATASETS
    if features == "classifier" and not has_classifier and any(m in ("kid", "pr") for m in chosen):
        raise DifftimeError(f"features='classifier' but there is no trained classifier for {dataset_spec!r}; "
                            f"classifiers exist for {', '.join(CLASSIFIER_DATASETS)}; use features='inception'")
    if "fd" in chosen and not has_classifier:
        raise DifftimeError(
            f"fd needs a trained classifier and there is none for {dataset_spec!r} (only for "
            f"{', '.join(CLASSIFIER_DATASETS)}); on this data use 'fid' (Inception features)"
            + (", and kid/pr run on Inception features" if is_image else "")
        )

    levels = data.scaler.levels if is_image else None
    x = _samples_array(samples, dataset_spec, data.shape, levels)
    ref_all = data.train if reference_split == "train" else data.test
    n_split = int(ref_all.shape[0])
    if n_reference is None:
        n_ref = n_split
        subset = "all"
    else:
        if not isinstance(n_reference, int) or isinstance(n_reference, bool) or not 1 <= n_reference <= n_split:
            raise DifftimeError(
                f"n_reference={n_reference!r}; expected an integer in 1..{n_split} (the {reference_split} split size)"
            )
        n_ref = n_reference
        subset = "all" if n_ref == n_split else f"first {n_ref} of permutation(seed={REFERENCE_SUBSET_SEED})"
    if subset == "all":
        ref = ref_all
    else:
        perm = np.random.default_rng(REFERENCE_SUBSET_SEED).permutation(n_split)[:n_ref]
        ref = ref_all[torch.from_numpy(np.sort(perm))]

    n = int(x.shape[0])
    need = max([2] + [PR_K + 1 for m in chosen if m == "pr"])
    if n < need or n_ref < need:
        why = f"pr with k={PR_K} needs k+1" if need > 2 else "a covariance or an unbiased estimate needs 2"
        raise DifftimeError(f"got {n} samples and {n_ref} reference points; {why} or more of each")

    out: dict[str, Any] = {"dataset": dataset_spec, "reference_split": reference_split, "n_samples": n,
                           "n_reference": n_ref, "reference_subset": subset}

    sizes = {"n_samples": n, "n_reference": n_ref, "reference_split": reference_split}
    if not is_image:
        for m in chosen:
            if m == "mmd":
                v, h = mmd_rbf(x, ref, seed=seed)
                out["mmd"] = {"value": v, "statistic": "unbiased MMD^2, RBF kernel", "bandwidth": h, **sizes}
            else:
                v, se = sliced_wasserstein(x, ref, n_projections=SWD_PROJECTIONS, seed=seed)
                out["swd"] = {"value": v, "se": se, "n_projections": SWD_PROJECTIONS, "p": 1, **sizes}
        return out

    # Image metrics: group them by feature space so each extractor runs once.
    use_inception_for_kp = features == "inception" or (features == "auto" and not has_classifier)
    groups: dict[str, list[str]] = {}
    for m in chosen:
        space = "inception" if m == "fid" or (m in ("kid", "pr") and use_inception_for_kp) else "classifier"
        groups.setdefault(space, []).append(m)

    counts = bootstrap_counts(n, bootstrap, seed) if bootstrap else None
    ref_sha = hashlib.sha256(ref.contiguous().numpy().tobytes()).hexdigest()
    for space, names in groups.items():
        if space == "inception":
            ex: Any = InceptionFeatures(levels=int(levels), path=inception_path)
            key_extra = {"preprocess": ex.preprocess, "levels": levels}
        else:
            ex = load_classifier(dataset_spec)
            key_extra = {"levels": levels}
        # The data hash keeps the cache honest for path specs (npz:FILE, cifar10:DIR) whose files change.
        key = {"dataset": dataset_spec, "split": reference_split, "n": n_ref, "subset": subset,
               "data_sha256": ref_sha, "extractor": ex.name, "extractor_sha256": ex.sha256, **key_extra}
        ref_feats, mu_r, sigma_r, info = reference_features(
            key, lambda ex=ex, space=space: _extract(ex, ref, shard, progress, f"{space} features: reference"),
            use_cache=use_cache, shard=shard)
        fx = _extract(ex, x, shard, progress, f"{space} features: samples")
        rec = {**_extractor_record(ex), **sizes}
        for m in names:
            if m in ("fid", "fd"):
                out[m] = {"value": frechet_distance_features(fx, ref_feats, stats2=(mu_r, sigma_r)), **rec}
                if counts is not None:
                    out[m].update(_replicates(frechet_bootstrap(fx, counts, mu_r, sigma_r), seed))
            elif m == "kid" and counts is not None:
                value, reps = kid_bootstrap(fx, ref_feats, counts)
                out["kid"] = {"value": value, "estimator": "full U-statistic", **_replicates(reps, seed), **rec}
            elif m == "kid":
                mean, std = kernel_inception_distance(fx, ref_feats, seed=seed)
                m_sub = min(1000, n, n_ref)
                out["kid"] = {"value": mean, "std": std, "estimator": "subset mean", "n_subsets": 100,
                              "subset_size": m_sub, **rec}
            else:
                p, r = precision_recall(ref_feats, fx, k=PR_K)
                out["pr"] = {"precision": p, "recall": r, "k": PR_K, **rec}
        out.setdefault("reference_cache", {})[space] = {"path": info["path"], "hit": info["hit"]}
    for m in chosen:  # keep the caller's order
        out[m] = out.pop(m)
    return out

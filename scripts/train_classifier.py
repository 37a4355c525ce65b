"""Train the feature classifiers that back the cheap FD / KID / precision-recall metrics.

    python scripts/train_classifier.py [digits mnist fashion-mnist] [--seed 0] [--out DIR]

Each dataset's CNN (``difftime.metrics.classifier.FeatureCNN``) is trained on the train split
with a fixed seed and deterministic algorithms, evaluated on the test split, and written as
``<dataset>.safetensors`` plus a ``<dataset>.json`` sidecar (dataset, test accuracy, seed,
architecture, feature dim, sha256 of the weights, the command that made it) into
``src/difftime/metrics/weights/`` by default.
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

from difftime.data import load_data
from difftime.io import save_json, save_tensors
from difftime.metrics.classifier import (
    CLASSIFIER_DATASETS,
    ClassifierFeatures,
    FeatureCNN,
    classifier_accuracy,
    classifier_config,
    levels_to_input,
    weights_dir,
)

# Enough for >= 95% (digits), >= 98% (MNIST) and >= 88% (Fashion-MNIST) test accuracy in a few
# minutes on two CPU cores.
RECIPES = {
    "digits": {"epochs": 40, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4},
    "mnist": {"epochs": 4, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4},
    "fashion-mnist": {"epochs": 6, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4},
}


def train_one(dataset: str, seed: int, out: Path, command: str) -> dict:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    recipe = RECIPES[dataset]
    data = load_data(dataset)
    cfg = classifier_config(dataset)
    net = FeatureCNN(cfg)
    x = levels_to_input(data.train, cfg["levels"])
    y = data.labels_train
    opt = torch.optim.AdamW(net.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    bs = recipe["batch_size"]
    steps_per_epoch = math.ceil(len(x) / bs)
    total = recipe["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    order_gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    net.train()
    for epoch in range(recipe["epochs"]):
        perm = torch.randperm(len(x), generator=order_gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            loss = loss_fn(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        print(f"{dataset}: epoch {epoch + 1}/{recipe['epochs']} loss {running / steps_per_epoch:.4f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    train_s = time.perf_counter() - t0
    net.eval()
    tensors = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    extractor = ClassifierFeatures(net, name=f"classifier:{dataset}", sha256="")
    train_acc = classifier_accuracy(extractor, data.train, data.labels_train)
    test_acc = classifier_accuracy(extractor, data.test, data.labels_test)
    out.mkdir(parents=True, exist_ok=True)
    sha = save_tensors(out / f"{dataset}.safetensors", tensors, metadata={"dataset": dataset, "seed": str(seed)})
    meta = {
        "dataset": dataset,
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "n_train": int(len(data.train)),
        "n_test": int(len(data.test)),
        "seed": seed,
        "config": cfg,
        "feature_dim": net.feature_dim,
        "feature_layer": "fc (hidden Linear) after ReLU, the penultimate layer",
        "input_mapping": "k / (levels - 1) * 2 - 1",
        "n_params": sum(p.numel() for p in net.parameters()),
        "recipe": {**recipe, "optimizer": "AdamW", "schedule": "cosine to 0, per step", "loss": "cross-entropy"},
        "sha256": sha,
        "command": command,
        "train_seconds": round(train_s, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
    }
    save_json(out / f"{dataset}.json", meta)
    print(f"{dataset}: test accuracy {test_acc:.4%} (train {train_acc:.4%}), {train_s:.0f}s, sha256 {sha[:12]}",
          flush=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", default=list(CLASSIFIER_DATASETS),
                   help=f"some of {', '.join(CLASSIFIER_DATASETS)} (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=weights_dir())
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest on a shared 2-core machine, where OpenMP threads contend")
    args = p.parse_args(argv)
    unknown = [d for d in args.datasets if d not in CLASSIFIER_DATASETS]
    if unknown:
        p.error(f"unknown datasets {unknown}; expected some of {', '.join(CLASSIFIER_DATASETS)}")
    torch.set_num_threads(args.threads)
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python scripts/train_classifier.py", *(shlex.quote(a) for a in argv)])
    for ds in args.datasets:
        train_one(ds, args.seed, args.out, command)


if __name__ == "__main__":
    main()

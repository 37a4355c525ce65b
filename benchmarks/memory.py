"""Peak memory of training and sampling: difftime against a bare PyTorch loop (training) and
against diffusers' DPM-Solver++ (sampling), on the same network, batch and NFE.

Each measurement runs in a fresh subprocess: it builds everything first, then resets the
kernel's peak-RSS mark (/proc/self/clear_refs) and reports the peak resident memory during
the work minus the resident memory before it. CPU only: on CUDA the figure to read would be
torch.cuda.max_memory_allocated.

    python benchmarks/memory.py [--steps 20] [--n 500] [--nfe 50]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import digits_run, flow_prior, row, standalone

MEASURES = ("train-difftime", "train-bare", "sample-difftime", "sample-dpm++")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}")


def _measure(name: str, args: argparse.Namespace) -> dict:
    """Set up ``name``'s work, then run it and return its peak memory above the set-up's."""
    from difftime.config import build_config
    from difftime.data import load_data

    if name.startswith("train"):
        from train_step import bare_loop

        from difftime.training import Trainer

        config = build_config(preset="digits", overrides={"train": {"ckpt_every": 10**9, "steps": args.steps}})
        data = load_data("digits")
        if name == "train-difftime":
            trainer, tmp = Trainer(config, data), tempfile.mkdtemp()
            work = lambda: trainer.fit(tmp, progress=False)  # noqa: E731
        else:
            step = bare_loop(config, data)
            work = lambda: [step() for _ in range(args.steps)]  # noqa: E731
    else:
        from peer_samplers import diffusers_sample

        from difftime.evaluation import draw_samples

        run = digits_run()
        if name == "sample-difftime":
            prior = flow_prior(run, 0.4)
            work = lambda: draw_samples(run, prior, 0.4, "heun", (args.nfe - 1) // 2, args.n, eps=run.sde.eps)  # noqa: E731
        else:
            work = lambda: diffusers_sample(run, "dpm++", args.nfe, args.n)  # noqa: E731
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    work()
    return {"measure": name, "peak_mib": (_status_kib("VmHWM") - before) / 1024, "rss_before_mib": before / 1024}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    parser.add_argument("--n", type=int, default=500, help="samples per measurement")
    parser.add_argument("--nfe", type=int, default=50, help="sampling budget (difftime Heun uses NFE - 1)")
    parser.add_argument("--measure", choices=MEASURES, help=argparse.SUPPRESS)  # the subprocess side


def run(args: argparse.Namespace) -> dict:
    digits_run()  # trained (and the prior fitted) here, not inside a measurement
    flow_prior(digits_run(), 0.4)
    found = {}
    for name in MEASURES:
        cmd = [sys.executable, __file__, "--measure", name, "--threads", str(torch.get_num_threads()),
               "--steps", str(args.steps), "--n", str(args.n), "--nfe", str(args.nfe)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        found[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {name}: peak {found[name]['peak_mib']:.1f} MiB above set-up", flush=True)
    rows = [
        row("peak memory", f"training, digits U-Net, batch 128, {args.steps} steps",
            found["train-difftime"]["peak_mib"], found["train-bare"]["peak_mib"], "MiB", "difftime Trainer",
            "bare PyTorch loop"),
        row("peak memory", f"sampling {args.n} digits, NFE {args.nfe}", found["sample-difftime"]["peak_mib"],
            found["sample-dpm++"]["peak_mib"], "MiB", "difftime heun, flow prior, T=0.4",
            "diffusers DPM-Solver++, T=1"),
    ]
    return {"results": found, "rows": rows}


if __name__ == "__main__":
    if "--measure" in sys.argv:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        parser.add_argument("--threads", type=int, default=1)
        args = parser.parse_args()
        torch.set_num_threads(args.threads)
        print(json.dumps(_measure(args.measure, args)))
    else:
        standalone("memory", add_arguments, run, __doc__.splitlines()[0])

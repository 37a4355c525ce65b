"""Training-step throughput: difftime's Trainer against a bare PyTorch loop, side by side.

Both run in this one process on the same network (the digits preset's U-Net), the same data,
the same DSM loss, AdamW, gradient clipping and EMA, in fp32 and under bf16 autocast. They
alternate in blocks so that drift in the machine's speed hits both alike; the ratio of median
block times is the overhead.

    python benchmarks/train_step.py [--blocks 6] [--steps-per-block 25]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import row, standalone

from difftime.config import build_config
from difftime.data import load_data
from difftime.nets import net_from_config
from difftime.training import Trainer


def bare_loop(config, data):
    """The same work, written the way one writes it by hand."""
    tr = config["train"]
    torch.manual_seed(config["seed"])
    from difftime.config import net_config

    model = net_from_config(net_config(config, data.shape))
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=tr["lr"], weight_decay=tr["weight_decay"])
    gen = torch.Generator().manual_seed(0)
    train = data.train
    eps, T = config["sde"]["eps"], tr["T"]
    b0, b1 = config["sde"]["b0"], config["sde"]["b1"]

    def step():
        idx = torch.randint(len(train), (tr["batch_size"],), generator=gen)
        k = train[idx].float()
        x0 = 2 * (k + torch.rand(k.shape, generator=gen)) / data.scaler.levels - 1
        t = eps + (T - eps) * torch.rand(len(x0), generator=gen)
        B = b0 * t + 0.5 * (b1 - b0) * t**2
        m, s = torch.exp(-B / 2)[:, None, None, None], torch.sqrt(-torch.expm1(-B))[:, None, None, None]
        z = torch.randn(x0.shape, generator=gen)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if tr["bf16"] else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = (model(m * x0 + s * z, t).float() - z).pow(2).flatten(1).mean(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"])
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - tr["ema_decay"])
        return loss.item()

    return step


def ours(config, data, run_dir):
    """Blocks of n steps through ``Trainer.fit``. Each block ends with a checkpoint (fit saves at its
    last step), which a real run writes once per ``train.ckpt_every`` steps: its time is taken out
    of the block and charged at that rate instead (``save_s`` holds the measured writes)."""
    trainer = Trainer(config, data)
    trainer.write_config(run_dir)
    save_s: list[float] = []
    save = trainer.save

    def timed_save(path):
        t0 = time.perf_counter()
        save(path)
        save_s.append(time.perf_counter() - t0)

    trainer.save = timed_save

    def block(n):
        trainer.tr["steps"] = trainer.step + n
        before = len(save_s)
        t0 = time.perf_counter()
        trainer.fit(run_dir, progress=False)
        wall = time.perf_counter() - t0 - sum(save_s[before:])
        return wall / n + statistics.median(save_s) / config["train"]["ckpt_every"]

    return block, save_s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps-per-block", type=int, default=25)


def run(args: argparse.Namespace) -> dict:
    data = load_data("digits")
    results, rows = {}, []
    for precision in ("fp32", "bf16"):
        config = build_config(preset="digits", overrides={"train": {"bf16": precision == "bf16"}})
        with tempfile.TemporaryDirectory() as tmp:
            block, save_s = ours(config, data, Path(tmp))
            step = bare_loop(config, data)
            block(5)
            for _ in range(5):
                step()
            ours_t, bare_t = [], []
            n = args.steps_per_block
            for _ in range(args.blocks):
                ours_t.append(block(n))
                t0 = time.perf_counter()
                for _ in range(n):
                    step()
                bare_t.append((time.perf_counter() - t0) / n)
        o, b = statistics.median(ours_t), statistics.median(bare_t)
        results[precision] = {"difftime_s_per_step": o, "bare_s_per_step": b, "ratio": o / b,
                              "batch_size": config["train"]["batch_size"], "blocks": args.blocks,
                              "steps_per_block": n, "checkpoint_s": statistics.median(save_s),
                              "ckpt_every": config["train"]["ckpt_every"]}
        rows.append(row("training step", f"digits U-Net, batch {config['train']['batch_size']}, {precision}",
                        o * 1e3, b * 1e3, "ms/step", "difftime Trainer", "bare PyTorch loop"))
    return {"results": results, "rows": rows}


if __name__ == "__main__":
    standalone("train_step", add_arguments, run, __doc__.splitlines()[0])

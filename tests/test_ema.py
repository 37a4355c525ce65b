"""The EMA warm-up: the first weights leave the average, resume stays exact, a young EMA warns."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from difftime.config import build_config
from difftime.data import load_data
from difftime.training import Trainer
from difftime.training.ema import ema_decay_at, ema_update, initial_weight_share

pytestmark = pytest.mark.usefixtures("one_thread")


def _tracked_share(decay: float, n: int, warmup: bool) -> float:
    """Average a module whose first weights are 1 and whose later weights are 0: what is left is
    exactly the share of the first weights."""
    module = nn.Linear(3, 2)
    ema = AveragedModel(module, multi_avg_fn=ema_update(decay, warmup), use_buffers=True)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(1.0)
    ema.update_parameters(module)  # the first update copies the weights
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    for _ in range(n - 1):
        ema.update_parameters(module)
    values = torch.cat([p.detach().flatten() for p in ema.module.parameters()])
    assert torch.allclose(values, values[0].expand_as(values))
    return float(values[0])


@pytest.mark.parametrize("decay,n", [(0.999, 2000), (0.9999, 2000), (0.995, 300)])
def test_after_n_updates_the_first_weights_hold_at_most_a_thousandth(decay, n):
    share = _tracked_share(decay, n, warmup=True)
    assert share <= 1e-3
    assert share == pytest.approx(initial_weight_share(decay, n), rel=1e-3, abs=1e-12)


def test_without_warmup_the_first_weights_stay_in_the_average():
    share = _tracked_share(0.999, 2000, warmup=False)  # the old default: 13.5% of the random init
    assert share == pytest.approx(0.999**1999, rel=1e-4) and share > 0.13
    assert initial_weight_share(0.999, 2000, warmup=False) == pytest.approx(share, rel=1e-4)


def test_the_decay_warms_up_to_its_ceiling():
    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 100) == pytest.approx(101 / 110)
    assert ema_decay_at(0.999, 10**6) == 0.999
    assert ema_decay_at(0.999, 5, warmup=False) == 0.999


def _trained(steps: int, warmup: bool) -> Trainer:
    config = build_config(overrides={
        "data": "digits",
        "net": {"kind": "unet", "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False},
        "train": {"steps": steps, "batch_size": 32, "lr": 1e-3, "warmup": 10, "ema_decay": 0.999,
                  "ema_warmup": warmup, "log_every": 100, "ckpt_every": 10_000},
    })
    trainer = Trainer(config, load_data("digits"))
    for _ in range(steps):
        trainer.train_step()
    return trainer


def test_a_200_step_ema_answers_like_the_trained_weights_at_T_max():
    """At t = T_max the eps-net must return ~x_t; an EMA full of the random init does not."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, 8, generator=gen)
    t = torch.ones(256)

    def rms_ratio(trainer: Trainer) -> float:
        with torch.no_grad():
            trained = trainer.model.eval()(x, t).pow(2).mean().sqrt()
            averaged = trainer.ema.module.eval()(x, t).pow(2).mean().sqrt()
        return float(averaged / trained)

    assert abs(rms_ratio(_trained(200, warmup=True)) - 1) <= 0.02
    assert abs(rms_ratio(_trained(200, warmup=False)) - 1) > 0.02  # the old behaviour fails this check


def test_a_young_ema_warns_once_at_the_final_save(tmp_path, capsys):
    trainer = _trained(5, warmup=False)
    trainer.tr["steps"] = 5
    trainer.write_config(tmp_path)
    trainer.save(tmp_path)
    err = capsys.readouterr().err
    assert err.count("warning: the EMA weights still hold") == 1 and "train.ema_warmup=true" in err


def test_decay_zero_keeps_no_share_of_the_first_weights():
    """ema_decay = 0 is valid (the EMA is the latest weights); the share is 0, not a log(0) error."""
    assert initial_weight_share(0.0, 1) == 1.0
    assert initial_weight_share(0.0, 5) == 0.0
    assert initial_weight_share(0.0, 5, warmup=False) == 0.0

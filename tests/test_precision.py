"""Precision and layout: bf16 autocast and channels_last in training; likelihoods stay float32."""

from __future__ import annotations

import pytest
import torch

from difftime.config import build_config
from difftime.data import load_data
from difftime.likelihood import elbo, ode_log_likelihood
from difftime.nets import MLP
from difftime.priors import StandardPrior
from difftime.run import load_run
from difftime.sde import VPSDE
from difftime.training import Trainer

TINY_UNET = {"kind": "unet", "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False}


def _bf16_sensitive_mlp() -> MLP:
    torch.manual_seed(0)
    net = MLP(dim=3, hidden=64)
    for p in net.parameters():  # away from the zero-output init, so bf16 rounding shows in the output
        torch.nn.init.normal_(p, std=0.1)
    return net.eval()


def test_likelihoods_ignore_a_callers_bf16_autocast():
    net, sde = _bf16_sensitive_mlp(), VPSDE()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    t = torch.full((16,), 0.5)
    with torch.no_grad():
        fp32 = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not torch.allclose(net(x, t).float(), fp32, atol=1e-4), "autocast must matter for this check"
    prior = StandardPrior.for_sde(sde, 1.0, (3,))

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        logp = ode_log_likelihood(net, sde, x, prior, 1.0, rtol=1e-3, atol=1e-3, divergence="exact").log_p
        terms = elbo(net, sde, x, prior, 1.0, n_t=8, n_prior=2, generator=torch.Generator().manual_seed(2))
        return logp, terms.total

    plain = both()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = both()
    for a, b in zip(plain, inside, strict=True):
        assert a.dtype == b.dtype == torch.float32 or a.dtype == b.dtype == torch.float64
        assert torch.equal(a, b)


def _digits(steps: int, **train) -> dict:
    return build_config(overrides={
        "data": "digits", "seed": 1, "net": TINY_UNET,
        "train": {"steps": steps, "batch_size": 32, "lr": 2e-3, "warmup": 2, "log_every": 1, "ckpt_every": 1000,
                  **train},
    })


def _curve(config: dict, out) -> list[float]:
    trainer = Trainer(config, load_data("digits"))
    trainer.write_config(out)
    trainer.fit(out, progress=False)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    return [float(line.split('"loss": ')[1].split(",")[0]) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("option", ["channels_last", "bf16"])
def test_precision_and_layout_options_train_the_same_model(tmp_path, option):
    """channels_last changes only the memory layout (same losses to float rounding); bf16 autocast
    changes the forward pass's precision (losses agree to bf16's ~3 significant digits)."""
    reference = _curve(_digits(4), tmp_path / "fp32")
    got = _curve(_digits(4, **{option: True}), tmp_path / option)
    rtol = 1e-4 if option == "channels_last" else 3e-2
    assert got == pytest.approx(reference, rel=rtol)
    run = load_run(tmp_path / option)  # the checkpoint is a plain float32, contiguous state dict
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in run.model.state_dict().values())

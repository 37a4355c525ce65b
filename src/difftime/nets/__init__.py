"""eps-prediction networks: ``model(x, t) -> eps_hat`` with absolute time t of shape (B,)."""

from __future__ import annotations

from typing import Any

from torch import nn

from difftime.errors import DifftimeError
from difftime.nets.mlp import MLP
from difftime.nets.precond import PRECONDITIONINGS, EDMPreconditioned
from difftime.nets.unet import UNet
from difftime.sde import SDE

NETS: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": UNet}


def net_from_config(config: dict[str, Any], sde: SDE | None = None) -> nn.Module:
    """Build a network from ``{"kind": "mlp"|"unet"|"diffusers", **kwargs}``.

    ``precond`` ("none" or "edm", with ``sigma_data``) wraps it in :class:`EDMPreconditioned`,
    which needs the run's ``sde``; the result is an eps-network either way.
    """
    config = dict(config)
    kind = config.pop("kind", None)
    precond = config.pop("precond", "none")
    sigma_data = config.pop("sigma_data", 0.5)
    if precond not in PRECONDITIONINGS:
        raise DifftimeError(f"unknown net.precond {precond!r}; expected one of {', '.join(PRECONDITIONINGS)}")
    if precond != "none" and sde is None:
        raise DifftimeError(f"net.precond={precond!r} needs the run's SDE to build the network")
    if kind == "diffusers":  # a retrofitted pretrained model; diffusers is an optional extra, imported lazily
        from difftime.nets.diffusers import DiffusersEps

        cls: type[nn.Module] = DiffusersEps
    elif kind in NETS:
        cls = NETS[kind]
    else:
        raise DifftimeError(f"unknown network kind {kind!r}; expected one of {sorted([*NETS, 'diffusers'])}")
    try:
        net = cls(**config)
    except TypeError as exc:
        raise DifftimeError(f"bad arguments for network {kind!r}: {exc}") from None
    return EDMPreconditioned(net, sde, sigma_data) if precond == "edm" else net


__all__ = ["MLP", "UNet", "NETS", "EDMPreconditioned", "PRECONDITIONINGS", "net_from_config"]

"""eps-prediction networks: ``model(x, t) -> eps_hat`` with absolute time t of shape (B,)."""

from __future__ import annotations

from typing import Any

from torch import nn

from difftime.errors import DifftimeError
from difftime.nets.mlp import MLP
from difftime.nets.unet import UNet

NETS: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": UNet}


def net_from_config(config: dict[str, Any]) -> nn.Module:
    """Build a network from ``{"kind": "mlp"|"unet"|"diffusers", **kwargs}``."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind == "diffusers":  # a retrofitted pretrained model; diffusers is an optional extra, imported lazily
        from difftime.nets.diffusers import DiffusersEps

        cls: type[nn.Module] = DiffusersEps
    elif kind in NETS:
        cls = NETS[kind]
    else:
        raise DifftimeError(f"unknown network kind {kind!r}; expected one of {sorted([*NETS, 'diffusers'])}")
    try:
        return cls(**config)
    except TypeError as exc:
        raise DifftimeError(f"bad arguments for network {kind!r}: {exc}") from None


__all__ = ["MLP", "UNet", "NETS", "net_from_config"]

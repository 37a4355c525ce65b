"""An MLP eps-network for vector data."""

from __future__ import annotations

from torch import Tensor, nn

from difftime.nets.time_embedding import FourierTime


class MLP(nn.Module):
    """Residual MLP; time enters every block through a learned projection of Fourier features."""

    def __init__(
        self, dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.time = nn.Sequential(FourierTime(time_dim), nn.Linear(time_dim, hidden), nn.SiLU())
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "temb": nn.Linear(hidden, hidden),
                    "body": nn.Sequential(
                        nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Dropout(dropout),
                        nn.Linear(hidden, hidden),
                    ),
                }
            )
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shape = x.shape
        h = self.inp(x.flatten(1))
        temb = self.time(t)
        for block in self.blocks:
            h = h + block["body"](h + block["temb"](temb))
        return self.out(h).reshape(shape)

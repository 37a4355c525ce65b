"""difftime: score-based diffusion models where the diffusion time T is a first-class choice."""

__version__ = "0.1.0"

from difftime.errors import DifftimeError  # noqa: E402
from difftime.sde import SDE, VESDE, VPSDE, SubVPSDE, sde_from_config  # noqa: E402

__all__ = ["DifftimeError", "SDE", "VPSDE", "SubVPSDE", "VESDE", "sde_from_config", "__version__"]

"""Fine-tuning methods, one file each, behind the `Method` interface in base.py."""

from .base import Context, Method
from .adapter import AdapterMethod
from .bitfit import BitFit
from .full import FullFinetune
from .lora import LoraMethod
from .prefix import PrefixMethod
from .router import TrajectoryRouter
from .tlora import TLoraMethod
from .trajectory import TrajectoryMethod
from .trajectory_adapter import TrajectoryAdapterMethod

METHODS: dict[str, type[Method]] = {
    TrajectoryMethod.name: TrajectoryMethod,
    FullFinetune.name: FullFinetune,
    LoraMethod.name: LoraMethod,
    PrefixMethod.name: PrefixMethod,
    AdapterMethod.name: AdapterMethod,
    BitFit.name: BitFit,
    TLoraMethod.name: TLoraMethod,
    TrajectoryAdapterMethod.name: TrajectoryAdapterMethod,
    TrajectoryRouter.name: TrajectoryRouter,
}


def build_method(config, backbone) -> Method:
    return METHODS[config.method](config, backbone)


__all__ = ["METHODS", "Context", "Method", "build_method"]

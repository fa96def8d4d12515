"""Fine-tuning methods, one file each, behind the `Method` interface in base.py."""

from .base import Context, Method
from .full import FullFinetune
from .trajectory import TrajectoryMethod

METHODS: dict[str, type[Method]] = {
    TrajectoryMethod.name: TrajectoryMethod,
    FullFinetune.name: FullFinetune,
}


def build_method(config, backbone) -> Method:
    return METHODS[config.method](config, backbone)


__all__ = ["METHODS", "Context", "Method", "build_method"]

"""Fine-tuning methods, one file each, behind the `Method` interface in base.py.

Every module here that defines `SPEC` (a `registry.MethodSpec`) is a method: importing this
package imports them all and registers their specs. Adding a method is adding one file.
"""

import importlib
import pkgutil

from . import registry
from .base import Context, Method

for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if hasattr(_module, "SPEC"):
        registry.register(_module.SPEC)


def build_method(config, backbone) -> Method:
    return registry.spec_of(config.method).method(config, backbone)


__all__ = ["Context", "Method", "build_method", "registry"]

"""Fine-tuning methods, one file each, behind the `Method` interface in base.py.

Every module here that defines `SPEC` (a `registry.MethodSpec`) is a method. Importing this
package imports none of them: the registry imports them all the first time it is asked for a
method (`registry.specs`, `names`, `spec_of`). Adding a method is:

1. one file here, ending in its `SPEC`;
2. if the method reads a config section of its own (`SPEC.section`, a dataclass in its file),
   one line in core/config.py's `Config`, `name: NameConfig = field(default_factory=NameConfig)`,
   with the dataclass imported from the method's file. tests/test_config.py checks that every
   registered section has its field there and that every method field there is registered.
"""

from . import registry
from .base import Context, Method


def build_method(config, backbone) -> Method:
    return registry.spec_of(config.method).method(config, backbone)


__all__ = ["Context", "Method", "build_method", "registry"]

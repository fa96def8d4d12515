"""The method registry: one `MethodSpec` per method, declared as `SPEC` in the method's own file.

Importing it imports no method: the methods import it (for `MethodSpec`), and config reads it
to validate. It fills itself the first time it is asked for a method (`specs`, `names`,
`spec_of`): it imports every module of the methods package and registers each one's `SPEC`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MethodSpec:
    """Everything the platform knows about a method outside its implementation."""

    name: str  # the value of `method:` in a config
    method: type  # the Method subclass, built as method(config, backbone)
    # Position in listings (the `method` choices of a config error, the Config sections).
    # Existing methods keep their order; a new method takes the next number.
    order: int
    # Its config section `<name>.*`: a dataclass with a default for every field, and the check
    # of its values (raises UserError naming the field). None: the method reads no section of
    # its own (it may read another method's, as trajectory_adapter reads `trajectory.*`).
    section: type | None = None
    validate: Callable[[object], None] | None = None
    # Budget matching: the field that sets the method's size (None: the size is fixed by the
    # backbone), and fields clamped to stay <= it when the knob changes.
    size_knob: str | None = None
    clamped_to_knob: tuple[str, ...] = ()
    # Baseline comparison: learning rates to try (empty: not compared) and settings applied
    # to every run of the method before its size is solved. The rates were placed by
    # single-seed calibration on the old SST-2 dev split, which is today's test split: they
    # only centre the range; the comparison's stage 1, on validation, picks the rate.
    lr_grid: tuple[float, ...] = ()
    comparison_sets: dict[str, object] = field(default_factory=dict)
    # The comparison's tuning candidates besides the rate: field -> values, the method's own
    # size and placement knobs (stage 1 tries them on validation, the same number of trials
    # per method). With a parameter budget the size knob is solved, not tuned, and a method
    # without a size knob tunes its rate only (its other knobs would change its fixed size).
    tuning: dict[str, tuple] = field(default_factory=dict)


_SPECS: dict[str, MethodSpec] = {}
_loaded = False  # every method module imported and its SPEC registered


def _load_methods() -> None:
    """Import the methods package's modules once, registering each module's SPEC."""
    global _loaded
    if _loaded:
        return
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        if hasattr(module, "SPEC"):
            register(module.SPEC)
    _loaded = True


def register(spec: MethodSpec) -> None:
    if spec.name in _SPECS and _SPECS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec


def specs() -> list[MethodSpec]:
    """Every registered method, in listing order."""
    _load_methods()
    return sorted(_SPECS.values(), key=lambda s: s.order)


def names() -> list[str]:
    return [s.name for s in specs()]


def spec_of(name: str) -> MethodSpec:
    _load_methods()
    return _SPECS[name]

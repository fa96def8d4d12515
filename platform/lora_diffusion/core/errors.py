"""One error type for bad user input.

Anything the user can fix (a config field, a missing file, an unknown backbone) raises
`UserError` with a message that names the field or file. The CLI prints it as one line and
exits with code 2, before anything is written.
"""


class UserError(ValueError):
    """Bad input the user can fix; the message names the field or file."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the message names the step and the loss. Not a
    UserError: the config was valid, the run is what failed (a sweep records it as the trial's
    failure_reason)."""


def check(ok: bool, name: str, problem: str) -> None:
    """Raise `UserError("field NAME: PROBLEM")` unless ok: how every config check reports."""
    if not ok:
        raise UserError(f"field {name}: {problem}")


def check_one_of(value: str, choices: tuple[str, ...], name: str) -> None:
    check(value in choices, name, f"unknown value {value!r} (valid: {', '.join(choices)})")

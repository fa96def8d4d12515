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


class OutOfDeviceMemory(RuntimeError):
    """A training step ran out of device memory (torch.OutOfMemoryError): one line naming the step
    and the knobs that lower the peak. An answer, not a crash: a sweep records the line as the
    trial's failure_reason and goes on; the CLI prints it and exits 3."""


# What lowers a trial's peak memory, in the order worth trying (the memory plan names them too).
MEMORY_KNOBS = ("train.micro_batch_size", "train.gradient_checkpointing", "max_length")


def out_of_memory(step: int, exc: BaseException) -> OutOfDeviceMemory:
    """The line a step that ran out of device memory ends with."""
    said = (str(exc).strip().splitlines() or ["out of memory"])[0][:120]
    return OutOfDeviceMemory(
        f"out of device memory at step {step}: lower train.micro_batch_size, set "
        f"train.gradient_checkpointing: true, or lower max_length (`lora-diffusion plan` shows the "
        f"peak per worker) [{said}]")


def check(ok: bool, name: str, problem: str) -> None:
    """Raise `UserError("field NAME: PROBLEM")` unless ok: how every config check reports."""
    if not ok:
        raise UserError(f"field {name}: {problem}")


def check_one_of(value: str, choices: tuple[str, ...], name: str) -> None:
    check(value in choices, name, f"unknown value {value!r} (valid: {', '.join(choices)})")

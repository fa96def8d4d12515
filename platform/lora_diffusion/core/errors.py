"""One error type for bad user input.

Anything the user can fix (a config field, a missing file, an unknown backbone) raises
`UserError` with a message that names the field or file. The CLI prints it as one line and
exits with code 2, before anything is written.
"""


class UserError(ValueError):
    """Bad input the user can fix; the message names the field or file."""

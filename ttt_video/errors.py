"""`UserError`, the base of every error caused by a user's input (bad flag, file, value): the CLI
prints its message on one line and exits with status 2."""

import math


class UserError(ValueError):
    pass


def check_positive(args, *names):
    """Refuse parsed options (`args.<name>`, given as `--<name>`) that are set but not positive and
    finite: a count of 0 or a length of nan leaves nothing to run."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (0 < value < math.inf):
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def first_sentence(error):
    """The first sentence of a library's error message (torch's and FFmpeg's run on for lines),
    or its type when it has none: what a one-line error can quote."""
    return str(error).split("\n")[0].split(". ")[0] or type(error).__name__

"""`UserError`, the base of every error caused by a user's input (bad flag, file, value): the CLI
prints its message on one line and exits with status 2."""

import argparse
import math


class UserError(ValueError):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the CLI and the benchmarks: a malformed command line (unknown flag or command, a
    value of the wrong type) is one line and exit status 2, not the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def flag(name):
    """The command-line spelling of a parsed option's name: `num_frames` -> `--num-frames`."""
    return f"--{name.replace('_', '-')}"


def check_positive(args, *names):
    """Refuse parsed options (`args.<name>`, given as `--<name>`) that are set but not positive and
    finite: a count of 0 or a length of nan leaves nothing to run."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (0 < value < math.inf):
            raise UserError(f"{flag(name)} must be positive, got {value}")


def int_list(args, name, least=0):
    """The integers of a parsed option `args.<name>` written as a comma-separated list
    (`--seeds 0,1,2`); another form, or a value below `least`, raises `UserError` naming it."""
    text = getattr(args, name)
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < least:
        raise UserError(f"{flag(name)} must be comma-separated integers of at least {least}, got {text!r}")
    return values


def first_sentence(error):
    """The first sentence of a library's error message (torch's and FFmpeg's run on for lines),
    or its type when it has none: what a one-line error can quote."""
    return str(error).split("\n")[0].split(". ")[0] or type(error).__name__

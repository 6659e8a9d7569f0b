"""`UserError`, the base of every error caused by a user's input (bad flag, file, value): the CLI
prints its message on one line and exits with status 2."""


class UserError(ValueError):
    pass


def first_sentence(error):
    """The first sentence of a library's error message (torch's and FFmpeg's run on for lines),
    or its type when it has none: what a one-line error can quote."""
    return str(error).split("\n")[0].split(". ")[0] or type(error).__name__

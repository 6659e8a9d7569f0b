"""The base of every error caused by a user's input (bad flag, file, value): the CLI prints
its message on one line and exits with status 2."""


class UserError(ValueError):
    pass

"""The one error type both sides turn into `exit 2` with a single line."""


class ContractError(ValueError):
    """Bad input named precisely: what is wrong, where, and what is accepted.

    Callers print `str(err)` as one line and exit with `EXIT_BAD_INPUT`.
    """


EXIT_BAD_INPUT = 2

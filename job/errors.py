"""Exit codes of the job: 2 bad input (contracts.errors.ContractError), 3 a machine that can't run it."""

EXIT_CANNOT_RUN = 3


class JobCannotRun(RuntimeError):
    """The machine can't run this config (no GPU, too little memory or disk): exit 3, one line."""

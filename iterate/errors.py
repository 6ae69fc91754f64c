"""What went wrong, as the command line reports it (``cli.exit_status``): ``BadInput`` is
input the user can fix (a setting, a path, a file's row, a run folder in use, changed or
damaged), raised on purpose with what to do, and exits with status 2. Any other exception
is a failure (status 1): an internal ``ValueError`` is a bug to report, not bad input."""


class BadInput(ValueError):
    """Input the user can fix: a setting, a path, a file's row. Exit status 2."""

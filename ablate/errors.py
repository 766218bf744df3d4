"""Errors a user can fix: the CLI prints them on one line and exits with status 2."""


class AblateError(Exception):
    """Bad input (a spec, a path, an option). The message is complete and printable as is."""

    exit_code = 2


class SpecError(AblateError):
    """One or more problems in a spec file, each ``file:line: field: problem (allowed: ...)``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

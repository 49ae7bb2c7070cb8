"""The one exception type for bad user input: the CLI prints its message and exits non-zero, with no traceback."""


class UserError(Exception):
    """A problem the user can fix (a bad config key, a missing file, an existing run directory...).

    The message must name the offending file/key/value and, where possible, what to do instead.
    """

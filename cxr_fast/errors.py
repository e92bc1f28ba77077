"""The one exception type that library code raises for a user's mistake.

The CLI turns it into a single line on stderr and exit code 1; anything else is a bug and keeps its traceback.
"""


class CxrFastError(Exception):
    """A problem with the user's input (a file, a flag, a manifest) that they can fix."""

"""The one exception type for input a user can fix.

Library code raises `MinillamaError` where a bad value is first seen, with a message that names the file, key
or value and what was expected. The CLI turns it into one line on stderr and exit code 2; anything else is a
bug and keeps its traceback.
"""


class MinillamaError(Exception):
    """Bad input: a wrong path, key, value or file. The message is shown to the user as it is."""

"""The one exception type that reaches the user as a one-line message instead of a traceback.

    raise UserError(f"--dataset_dir {path}: no such directory; pass a folder of images with .txt captions")
"""


class UserError(Exception):
    """A problem the user can fix: bad input, bad config, missing files. Printed as one line, exit code 2."""

    exit_code = 2

"""One base class for the errors users can cause (bad config, data, checkpoints, arguments).

Commands catch `EvertrainError` and print its message as a single line, exit status 2.
"""


class EvertrainError(Exception):
    """A problem with the user's input; the message names the file, key or argument."""

"""Errors a user can fix: the CLIs print their message on one line and exit non-zero, without a traceback."""


class UserError(Exception):
    """Bad input from the user (unknown data set, missing data, bad class names, unusable device)."""

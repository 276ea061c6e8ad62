"""User-facing errors: one clear line (what is wrong, how to fix it), no traceback."""


class UserError(Exception):
    """Bad input from the user (config, paths, files). The entry point prints it as one line and exits 2."""

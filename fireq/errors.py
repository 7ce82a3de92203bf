"""The one exception a user can hit. The CLI prints its message on one line and exits non-zero."""


class FireqError(Exception):
    """A problem with the user's input (path, model, data, recipe, checkpoint), stated in one line."""

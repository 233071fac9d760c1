"""User-facing errors: raised for bad input, shown by the CLI as one line with a non-zero exit."""


class CTRayError(Exception):
    """A problem with the user's input or environment (not a bug in ct_ray)."""


class ModelError(CTRayError):
    pass


class CLTError(CTRayError):
    pass


class PromptError(CTRayError):
    pass


class StorageError(CTRayError):
    pass

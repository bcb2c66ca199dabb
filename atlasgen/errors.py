"""User-facing errors: one clear line plus a hint, turned into a non-zero exit by the CLI."""


class AtlasError(Exception):
    """A problem with the user's input or environment (not a bug in atlasgen)."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message + (f" (hint: {self.hint})" if self.hint else "")


class StoreVersionError(AtlasError):
    pass


class ModelLoadError(AtlasError):
    pass


class DataLoadError(AtlasError):
    pass


class StageInputError(AtlasError):
    """A stage was asked to run before the stage it needs (e.g. encode before train)."""

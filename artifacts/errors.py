"""Errors of the store. Messages are one line that names the problem and the fix."""


class StoreError(Exception):
    """The store cannot do what was asked (bad URL, unwritable root, unknown ref...)."""


class ArtifactMissing(StoreError):
    """No committed artifact under this key or ref."""


class ArtifactCorrupt(StoreError):
    """An artifact's files do not match its manifest (size or sha256)."""

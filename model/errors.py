"""The one exception type for bad input to a stage.

Its message is a single line that names the problem and the fix; the CLI prints it as-is and exits
nonzero, and the stage runner discards the stage's staging directory so nothing half-made survives.
"""


class InputError(ValueError):
    """Bad input data or config detected by a stage (empty corpus, undecodable file, corrupt shard...)."""

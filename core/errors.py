"""The base of every expected user mistake: `UserError`.

Entry points answer it with one line `error: <message>` and exit status 2 (`core/cli.py`); anything else is
a bug and keeps its traceback. Each package derives its own kinds from it (`ConfigError`, `DataFileError`,
`BadSampleError`, `ModelDirError`, ...). This module imports nothing, so every module may import it.
"""


class UserError(Exception):
    """An expected mistake in the user's input (a file, a key, a sample, a model directory); the message
    says what and where, and what to do. Entry points print it as one line (core/cli.py)."""

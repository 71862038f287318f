"""The errors that mean "fix your input", reported as one line instead of a traceback."""

from mmer_ext.data import DataFormatError
from mmer_ext.train import CheckpointError, ConfigError

USER_ERRORS = (ConfigError, DataFormatError, CheckpointError, FileNotFoundError)

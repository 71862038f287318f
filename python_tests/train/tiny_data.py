"""The tiny synthetic data of the trainer and CLI tests (a module, not conftest, so test files can import it)."""

TINY = {"preset": "small", "n_train": 96, "n_val": 24, "n_test": 24}

"""Suite-wide: a missing real part fails the run under scripts/test.sh (see tests/real_parts.py)."""

pytest_plugins = ["real_parts"]

"""Make ``import ropekern`` work when a script runs from a checkout that is not pip-installed."""

import sys
from pathlib import Path

try:
    import ropekern  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

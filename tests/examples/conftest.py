"""The example plugins' tests reuse the Envoy runner that lives with the test plugins."""

from __future__ import annotations

import sys
from pathlib import Path

PLUGINS_TEST_DIR = Path(__file__).resolve().parents[1] / "plugins"
if str(PLUGINS_TEST_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGINS_TEST_DIR))

"""Engine tests import their toy methods as ``toys`` (also from DDP subprocesses)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

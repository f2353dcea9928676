"""The private-containerd test-bed now lives in :mod:`tools.testbed.containerd`.

Kept as a re-export for test modules not yet switched to the new import;
new code imports from :mod:`tools.testbed.containerd`.
"""

from tools.testbed.containerd import *  # noqa: F401,F403
from tools.testbed.containerd import __all__  # noqa: F401

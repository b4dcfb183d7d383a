"""
Entry point: C{python -m benchmarks [options]}.
"""

import sys

from benchmarks.cli import main

sys.exit(main())

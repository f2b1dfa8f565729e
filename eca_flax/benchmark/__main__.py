"""``python -m eca_flax.benchmark``."""

import sys

from eca_flax.benchmark.cli import main

sys.exit(main())

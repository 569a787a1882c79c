"""`python3 -m lutmm ...`: the lutmm command line (see lutmm.cli)."""
import sys

from .cli import main

sys.exit(main())

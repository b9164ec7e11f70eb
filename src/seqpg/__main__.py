"""`python -m seqpg ...` (also what `torchrun -m seqpg train ...` runs)."""

import sys

from .apps.cli import main

sys.exit(main())

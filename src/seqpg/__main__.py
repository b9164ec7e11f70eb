"""`python -m seqpg ...` (also what `torchrun -m seqpg train ...` runs)."""

import sys

from .cli import main

sys.exit(main())

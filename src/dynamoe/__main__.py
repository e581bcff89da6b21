"""`python -m dynamoe` (and `torchrun -m dynamoe`) run the command-line interface."""

import sys

from dynamoe.cli import main

sys.exit(main())

"""``python -m leanstep`` runs the command line."""

import sys

from leanstep.cli import main

sys.exit(main())

"""`python -m bptt ...` runs the `bptt` command (for environments where the console script is not installed)."""

import sys

from bptt.cli import main

sys.exit(main())

"""`python -m lowbit …` runs the CLI."""

import sys

from lowbit.cli import main

sys.exit(main())

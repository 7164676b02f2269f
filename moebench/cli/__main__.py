"""``python -m moebench.cli``: the `moebench` command line."""

import sys

from moebench.cli import main

sys.exit(main())

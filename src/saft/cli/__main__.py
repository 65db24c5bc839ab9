"""``python -m saft.cli``: the ``saft`` command (torchrun runs a step's ranks through it)."""

import sys

from saft.cli import main

sys.exit(main())

"""Run several ``saft`` command lines in one process (or one torchrun job), in order.

Usage: ``python dist_driver.py '["score", ...]' '["finetune", ...]' ...``. Each argument
is one command line as JSON; the commands share the process group, so a test launches
torchrun once instead of once per command.
"""

import json
import sys

from saft.cli import main

if __name__ == "__main__":
    for argv in sys.argv[1:]:
        code = main(json.loads(argv))
        if code:
            sys.exit(code)

"""One rank of ``saft bench step --nproc N``, started by torchrun (see :mod:`saft.bench.step_dist`)."""

import sys

from saft.bench.step_dist import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))

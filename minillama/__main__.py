"""`python -m minillama ...` is the `minillama` command; what torchrun starts on every rank:

    torchrun --nproc-per-node 8 -m minillama train --config configs/gpu-1b.toml --set train.parallel=fsdp
"""

import sys

from minillama.cli import main

if __name__ == "__main__":
    sys.exit(main())

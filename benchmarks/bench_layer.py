"""One linear layer fwd+bwd: base, PEFT LoRA and every molora expert path (see molora.apps.bench.layer).

    python benchmarks/bench_layer.py --help
"""

import sys

from molora.apps.bench.layer import main

if __name__ == "__main__":
    sys.exit(main())

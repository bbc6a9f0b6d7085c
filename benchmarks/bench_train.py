"""Training steps of a Llama-shaped model: PEFT LoRA, molora routers, mixlora (see molora.apps.bench.train).

    python benchmarks/bench_train.py --help
"""

import sys

from molora.apps.bench.train import main

if __name__ == "__main__":
    sys.exit(main())

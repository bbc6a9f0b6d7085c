"""Training steps of a Llama-shaped model: PEFT LoRA, molora routers, mixlora (see molora.bench.train).

    python benchmarks/bench_train.py --help
"""

import sys

from molora.bench.train import main

if __name__ == "__main__":
    sys.exit(main())

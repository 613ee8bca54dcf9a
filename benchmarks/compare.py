"""nextok vs transformers, llama.cpp and CTranslate2 on the default model: one run, one table.

    .venv/bin/python benchmarks/compare.py [--scale 0.25] [--workloads greedy-1,beam-5] [--engines ...]

Same as `nextok bench`; llama.cpp and CTranslate2 columns appear once `make bench-peers` installed them.
"""

import sys

from nextok.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

"""The ``bilevel`` console script: the CLI, or one clear line when the ``bench`` extra (the
harness's dependencies) is not installed.

The script flushes subnormal floats to zero (``torch.set_flush_denormal``): once values fall
below ~1e-38 (float32), CPU arithmetic on them runs several times slower — hyper_cleaning with
model=mlp on digits went from 0.022 to 0.128 s per cg step by step 300, as the weights of
corrupted samples underflowed. The library itself leaves this global setting to its user.
"""

from __future__ import annotations

import sys

BENCH_EXTRA = ("yaml", "tqdm", "matplotlib", "sklearn", "PIL", "fontTools")


def main() -> int:
    import torch

    torch.set_flush_denormal(True)  # a no-op where the CPU lacks the mode
    try:
        from bilevel.cli import main as cli_main
    except ModuleNotFoundError as err:
        if err.name not in BENCH_EXTRA:
            raise
        print(f"bilevel: error: the bilevel command needs the bench extra ({err.name} is "
              "missing): pip install 'bilevel[bench]'", file=sys.stderr)  # fmt: skip
        return 2
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())

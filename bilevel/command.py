"""The ``bilevel`` console script: the CLI, or one clear line when the ``bench`` extra (the
harness's dependencies) is not installed."""

from __future__ import annotations

import sys

BENCH_EXTRA = ("yaml", "tqdm", "matplotlib", "sklearn", "PIL", "fontTools")


def main() -> int:
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

"""``python -m moekit``: the same as the ``moekit`` console script."""

from .tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m molora.cli``: the command line, kept at this path for scripts and launchers.

The commands live in :mod:`molora.apps.cli`; the ``molora`` console script points there too.
"""

from molora.apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

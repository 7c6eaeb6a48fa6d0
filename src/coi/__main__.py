"""`python -m coi`: the same as the `coi` command."""

from coi.cli import main

raise SystemExit(main())

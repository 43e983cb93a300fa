"""`python -m daemon` is the `tocsin` command."""
from .cli import main

raise SystemExit(main())

"""`python -m trio_serve`: the same command line as `initrunner`."""

from trio_serve.cli import main

raise SystemExit(main())

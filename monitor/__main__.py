"""Run the command line as `python -m monitor`."""

from monitor.cli import main

raise SystemExit(main())

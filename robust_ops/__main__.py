from .cli import finished, main

raise SystemExit(finished(main()))

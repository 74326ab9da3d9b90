"""``python -m bench [--quick] [--tiny] [--out DIR]``."""

from bench import main

raise SystemExit(main())

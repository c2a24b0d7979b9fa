"""python -m dynamixer_ops.bench: the dynamixer-bench command line."""
import sys

from .cli import main

sys.exit(main())

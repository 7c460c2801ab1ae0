"""``python -m aule.bench``: the same as ``aule bench``."""
import sys

from . import main

sys.exit(main(sys.argv[1:]))

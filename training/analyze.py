"""``python -m training.analyze``: the section 5.1 analysis command (``training.evaluation.analysis``)."""

import sys

from training.evaluation.analysis import main

if __name__ == "__main__":
    sys.exit(main())

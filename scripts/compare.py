"""Compare finished runs from their local records: python scripts/compare.py RUN_DIR [RUN_DIR ...]"""

import sys

from imagegen.compare import format_table, summarize

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(format_table([summarize(d) for d in sys.argv[1:]]))

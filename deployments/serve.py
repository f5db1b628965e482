"""Serve the demo deployments without a work pool (same as `samplepipe serve`).

python deployments/serve.py --interval 3600
"""

import sys

from samplepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))

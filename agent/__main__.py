"""``python -m agent``: the same as the ``edgeai-agent`` command."""

import sys

from agent.cli import main

if __name__ == "__main__":
    sys.exit(main())

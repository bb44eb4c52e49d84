import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned process (the speed probe's load) imports it
    sys.exit(main())

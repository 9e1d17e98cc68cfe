"""`python -m handclip.benchmark`: the command lives in `handclip.tools.benchmark`."""

from handclip.tools.benchmark import *  # noqa: F403 - the same names, under the documented module path
from handclip.tools.benchmark import main

if __name__ == "__main__":
    main()

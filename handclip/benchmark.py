"""`python -m handclip.benchmark`: the command lives in `handclip.train.benchmark`."""

from handclip.train.benchmark import *  # noqa: F403 - the same names, under the documented module path
from handclip.train.benchmark import main

if __name__ == "__main__":
    main()

"""`python -m handclip.evaluate`: the command lives in `handclip.train.evaluate`."""

from handclip.train.evaluate import *  # noqa: F403 - the same names, under the documented module path
from handclip.train.evaluate import main

if __name__ == "__main__":
    main()

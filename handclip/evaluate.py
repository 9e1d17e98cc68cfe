"""`python -m handclip.evaluate`: the command lives in `handclip.tools.evaluate`."""

from handclip.tools.evaluate import *  # noqa: F403 - the same names, under the documented module path
from handclip.tools.evaluate import main

if __name__ == "__main__":
    main()

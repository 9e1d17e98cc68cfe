"""`python -m handclip.features`: the command lives in `handclip.tools.features`."""

from handclip.tools.features import *  # noqa: F403 - the same names, under the documented module path
from handclip.tools.features import main

if __name__ == "__main__":
    main()

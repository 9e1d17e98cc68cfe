"""`python -m handclip.export`: the command lives in `handclip.tools.export`."""

from handclip.tools.export import *  # noqa: F403 - the same names, under the documented module path
from handclip.tools.export import main

if __name__ == "__main__":
    main()

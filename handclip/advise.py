"""`python -m handclip.advise`: the command lives in `handclip.train.advise`."""

from handclip.train.advise import main

if __name__ == "__main__":
    main()

"""`python -m flows.cli ...`: the same as the `alignsearch` console script."""

from flows.cli import main

if __name__ == "__main__":
    main()

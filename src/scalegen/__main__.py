"""`python -m scalegen` runs the command line."""
from scalegen.cli.main import main

if __name__ == "__main__":
    main()

"""`make run`: start a local EMS. The hub arrives in step 2; until then this says so."""

import sys


def main() -> int:
    print("ems: the hub is not built yet (step 2); `make test` runs what exists.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

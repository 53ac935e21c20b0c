"""`python -m convert ...`: see convert/cli.py. Known failures print one message, no traceback."""

import sys

from convert.cli import main
from convert.pipeline import ConversionError
from convert.readers import CheckpointError

if __name__ == "__main__":
  try:
    sys.exit(main())
  except (ConversionError, CheckpointError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)

"""`python -m proxyprefill ...` runs the `proxyprefill` command."""

import sys

from proxyprefill.cli import main

sys.exit(main())

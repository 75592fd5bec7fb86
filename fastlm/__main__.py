"""``python -m fastlm ...`` is ``fastlm ...``."""
import sys

from fastlm.cli import main

sys.exit(main())

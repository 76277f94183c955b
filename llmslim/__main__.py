import sys

from llmslim.cli import main

sys.exit(main())

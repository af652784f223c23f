import sys

from makima_tts.cli import main

sys.exit(main())

import sys

from biollm_cls.cli import main

sys.exit(main())

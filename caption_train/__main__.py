import sys

from caption_train.cli import main

sys.exit(main())

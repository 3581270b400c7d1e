import sys

from gptjax.train import main

sys.exit(main())

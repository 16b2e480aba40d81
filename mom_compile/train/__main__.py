import logging
import os
import sys

from .cli import main

code = main()
if "WORLD_SIZE" in os.environ:
    # Under torchrun the process group outlives destroy_process_group (DTensor's caches hold it),
    # and gloo's worker threads can still be releasing collective buffers while the interpreter
    # tears down, which aborts the process (SIGABRT) after a successful run. Every file is closed
    # by now, so leave without the teardown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)

"""``python -m extproc.evaluation --config POLICY --data EVAL.jsonl``: the same as ``extproc eval``."""

import sys

from extproc.evaluation.cli import main

sys.exit(main(sys.argv[1:]))

"""Offline evaluation of a routing policy on labelled prompts: ``extproc eval``.

data (JSONL) -> offline (the real Router.choose, no replicas) -> knobs (sweep one policy
value) -> curves and baselines (RouteLLM metrics, single models, random, oracle) -> plot, cli.
"""

from extproc.evaluation.data import DataError, Example, load_examples
from extproc.evaluation.evaluate import Options, evaluate
from extproc.evaluation.knobs import KnobError
from extproc.evaluation.offline import EvalError

__all__ = ["DataError", "EvalError", "Example", "KnobError", "Options", "evaluate", "load_examples"]

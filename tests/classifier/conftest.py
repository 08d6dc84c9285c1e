import pytest

from extproc.classifier import Classifier


@pytest.fixture(scope="session")
def classifier() -> Classifier:
    """The shipped model, loaded once for the whole test session."""
    return Classifier.load(threads=2)

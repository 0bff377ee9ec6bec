"""Shared fixtures: a random-weight Llama with a trained BPE tokenizer, made offline."""

import pytest

import mlx_dpo  # noqa: F401  (loads the fast BLAS before mlx)
from mlx_dpo.toy import make_model, make_preference_data

pytest_plugins = ["tests.strict_ci"]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A 2-layer, 64-wide Llama with a 512-token vocabulary, in Hugging Face layout."""
    return make_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def other_model_path(tmp_path_factory):
    """A second random model with the same tokenizer, for reference_model tests."""
    return make_model(tmp_path_factory.mktemp("other_model"), seed=1)


@pytest.fixture(scope="session")
def tiny_data_path(tmp_path_factory):
    return make_preference_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model_path)

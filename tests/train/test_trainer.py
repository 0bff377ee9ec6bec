"""Trainer features that must not change the maths: accumulation, checkpointing, compile."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.llama import TransformerBlock
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from mlx_dpo.compute.batching import pad_batch
from mlx_dpo.compute.reference import make_reference
from mlx_dpo.data import load_datasets
from mlx_dpo.train.trainer import TrainingArgs, train
from tests.support import make_loss


def fixed_batches(batches):
    """An iterate_batches stand-in that replays the given batches in order."""

    def it(dataset, batch_size, loop=False, **kw):
        while True:
            yield from batches
            if not loop:
                return

    return it


def trained_weights(model_path, batches, tmp_path, callback=None, **targs):
    mx.random.seed(0)
    model, _ = load(str(model_path))
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    loss_fn = make_loss("dpo", make_reference(model), beta=0.1)
    args = TrainingArgs(batch_size=4, steps_per_report=100, steps_per_eval=100, val_batches=0,
                        adapter_file=str(tmp_path / "a.safetensors"), **targs)
    train(model, optim.SGD(learning_rate=0.05), loss_fn, [None], None, fixed_batches(batches), args, training_callback=callback)
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


@pytest.fixture(scope="module")
def pairs(tiny_model_path, tiny_data_path):
    _, tok = load(str(tiny_model_path))
    return load_datasets(str(tiny_data_path), tok, "pairs", 128, splits=("train",))["train"][:8]


def test_grad_accumulation_equals_one_large_batch(tiny_model_path, pairs, tmp_path):
    full = [pad_batch(pairs[:4]), pad_batch(pairs[4:8])]
    halves = [pad_batch(pairs[0:2]), pad_batch(pairs[2:4]), pad_batch(pairs[4:6]), pad_batch(pairs[6:8])]
    a = trained_weights(tiny_model_path, full, tmp_path, iters=2)
    b = trained_weights(tiny_model_path, halves, tmp_path, iters=4, grad_accumulation_steps=2)
    c = trained_weights(tiny_model_path, halves, tmp_path, iters=4)  # no accumulation: different
    assert any(np.abs(a[k]).max() > 1e-3 for k in a)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-6)
    assert max(np.abs(a[k] - c[k]).max() for k in a) > 1e-4


@pytest.mark.parametrize("option", [{"compile": False}, {"grad_checkpoint": True}])
def test_compile_and_grad_checkpoint_do_not_change_the_result(tiny_model_path, pairs, tmp_path, option):
    batches = [pad_batch(pairs[:4]), pad_batch(pairs[4:8])]
    a = trained_weights(tiny_model_path, batches, tmp_path, iters=3)
    b = trained_weights(tiny_model_path, batches, tmp_path, iters=3, **option)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-6)


def test_grad_checkpoint_leaves_the_layer_class_as_it_found_it(tiny_model_path, pairs, tmp_path):
    """mlx-lm's grad_checkpoint patches the layer class; a run puts it back, so that a later run
    in the process (with prefix sharing, say) does not inherit checkpointed layers."""
    before, calls = TransformerBlock.__call__, []

    class Watch(TrainingCallback):
        def on_train_loss_report(self, info):
            calls.append(TransformerBlock.__call__)

    trained_weights(tiny_model_path, [pad_batch(pairs[:4])], tmp_path, Watch(), iters=1, grad_checkpoint=True)
    assert calls and calls[0] is not before  # checkpointed during the run
    assert TransformerBlock.__call__ is before and "_mlx_dpo_checkpointed" not in TransformerBlock.__dict__

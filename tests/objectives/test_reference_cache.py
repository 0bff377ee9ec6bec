"""The reference cache (``precompute_reference``) is keyed on everything that sets a reference
log-prob: a change anywhere in the weights or the configuration, in the data or in how it is
batched, computes the values afresh instead of reusing stale ones."""

import json
import shutil

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load

from mlx_dpo.compute.reference import make_reference
from mlx_dpo.data import load_datasets
from mlx_dpo.objectives.reference_cache import cached_reference, weights_fingerprint


def test_one_weight_away_from_the_sampled_columns_changes_the_fingerprint(tiny_model_path):
    model, _ = load(str(tiny_model_path))
    before = weights_fingerprint(model)
    embed = np.array(model.model.embed_tokens.weight)
    assert embed.size > 4096  # large enough that a strided sample would skip most values
    embed[3, 5] += 1e-3  # row 3, column 5: flat index 197, off every 8th value
    model.model.embed_tokens.weight = mx.array(embed)
    assert weights_fingerprint(model) != before
    embed[3, 5] -= 1e-3
    model.model.embed_tokens.weight = mx.array(embed)
    assert weights_fingerprint(model) == before  # the same bytes: the same key


def test_the_configuration_is_part_of_the_fingerprint(tiny_model_path, tmp_path):
    other = tmp_path / "rope"
    shutil.copytree(tiny_model_path, other)
    config = json.loads((other / "config.json").read_text())
    config["rope_theta"] = config.get("rope_theta", 10000.0) * 2
    (other / "config.json").write_text(json.dumps(config))
    assert weights_fingerprint(load(str(other))[0]) != weights_fingerprint(load(str(tiny_model_path))[0])


def test_a_changed_reference_is_computed_again_not_reused(tiny_model_path, tiny_data_path, tmp_path):
    model, tok = load(str(tiny_model_path))
    examples = load_datasets(str(tiny_data_path), tok, "pairs", 128, splits=("train",))["train"][:8]
    cache = tmp_path / "reference_cache"

    def values(m, **kw):
        ds = cached_reference(make_reference(m, m), examples, cache, "train", weights_fingerprint(m), 4, show_progress=False, **kw)
        return ds.fields["reference_logps"]

    first = values(model)
    assert np.array_equal(values(model), first) and len(list(cache.iterdir())) == 1  # reused
    w = np.array(model.model.layers[0].mlp.down_proj.weight)
    w[7, 30] += 0.5
    model.model.layers[0].mlp.down_proj.weight = mx.array(w)
    second = values(model)
    assert len(list(cache.iterdir())) == 2 and not np.allclose(second, first)
    values(model, share_prefix=True)
    assert len(list(cache.iterdir())) == 3

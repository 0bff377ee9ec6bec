"""The architecture matrix: a tiny random instance of each family people fine-tune (tests/support.py,
``ARCHITECTURES``: every structural feature, a few layers), through every path that claims it.

- log-probs equal a float64 NumPy log-softmax of the model's own logits, on the plain path and on
  each fast path (chunked head, packed head, two CPU streams);
- DPO and KTO losses and gradients through each fast path, and through prompt sharing where the
  start-up check allows it, equal the plain full-logit path; where it does not, the reason is one
  plain sentence;
- a GRPO rollout with the KV cache gives the same greedy tokens as decoding without a cache;
- LoRA, DoRA and QLoRA train a step from the command line, ``mlx_dpo.fuse`` fuses and
  ``mlx_dpo.generate`` answers; DoRA on expert layers is refused in one line.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.generate import stream_generate
from mlx_lm.utils import load

from mlx_dpo.compute.batching import pad_batch
from mlx_dpo.compute.forward import PLAIN, Forward, sequence_logps, sharing_problem
from mlx_dpo.compute.logps import HEAD_OUTPUT, split_head
from mlx_dpo.compute.reference import make_reference
from mlx_dpo.compute.streams import cpu_stream
from mlx_dpo.online.rollout import SamplingParams, rollout_problem, sample_groups
from tests.support import ARCHITECTURES, make_loss, numpy_pair_logps, random_pairs, tiny_architecture

FAMILIES = list(ARCHITECTURES)
# Each fast path a run may choose: (chunk_size, CPU streams, packed head).
PATHS = {"chunked": Forward(3, (), False), "packed": Forward(0, (), True),
         "two streams": Forward(0, (cpu_stream(0), cpu_stream(1)), False)}
HYBRID = {"qwen3_next", "lfm2", "nemotron_h"}  # recurrent layers: a state per sequence, stopped at each prompt's length


@pytest.fixture(scope="module")
def adapted():
    """Each family once, with LoRA on every layer (lora_b random, so the policy differs from its base)."""
    built = {}

    def get(family):
        if family not in built:
            model = tiny_architecture(family)
            model.freeze()
            linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 10.0, "dropout": 0.0})
            for _, layer in model.named_modules():
                if "lora_b" in layer:
                    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
            built[family] = model
        return built[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_on_every_path_are_float64_numpy_of_the_models_logits(adapted, family):
    model = adapted(family)
    assert family in HEAD_OUTPUT and split_head(model) is not None  # the fast head claims every family here
    examples = random_pairs(4)
    want = numpy_pair_logps(model, examples)
    for name, how in {"plain": PLAIN, **PATHS}.items():
        got, _ = sequence_logps(model, pad_batch(examples), how)
        np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=2e-4, err_msg=f"{family}: {name}")


def loss_and_grads(model, loss_type, batch, how):
    loss_fn = make_loss(loss_type, reference=make_reference(model, None, how), beta=0.1, how=how)
    (loss, _), grads = nn.value_and_grad(model, loss_fn)(model, batch)
    mx.eval(loss, grads)
    return loss.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_and_kto_losses_and_gradients_equal_the_plain_path_on_every_fast_path(adapted, family):
    model = adapted(family)
    problem = sharing_problem(model)
    if family == "nemotron_h":  # mlx-lm's Mamba2 state ignores a row's length: the check measures the gap
        assert problem.startswith("the shared forward differs from the plain one"), problem
    elif family == "gemma2":  # its attention reshapes queries per KV head: a per-row prompt mask does not fit
        assert problem.startswith("its attention layers do not take a shared prompt's cache (ValueError"), problem
    else:
        assert problem is None, problem
    examples = random_pairs(4, seed=1)
    for loss_type in ("dpo", "kto"):
        batches = {"plain": pad_batch(examples), "shared": pad_batch(examples, share_prefix=True)}
        for b in batches.values():
            b["label"] = mx.array([1.0, 0.0, 1.0, 0.0])  # KTO: desirable / undesirable rows
        want_loss, want_grads = loss_and_grads(model, loss_type, batches["plain"], PLAIN)
        assert abs(want_loss - (np.log(2) if loss_type == "dpo" else 0.5)) > 1e-4 or loss_type == "kto"
        paths = [(name, batches["plain"], how) for name, how in PATHS.items()]
        if problem is None:
            paths += [("shared", batches["shared"], PLAIN), ("shared, packed", batches["shared"], PATHS["packed"])]
        for name, batch, how in paths:
            loss, grads = loss_and_grads(model, loss_type, batch, how)
            np.testing.assert_allclose(loss, want_loss, rtol=1e-4, atol=1e-6, err_msg=f"{family} {loss_type}: {name}")
            assert grads.keys() == want_grads.keys() and grads
            for k, g in grads.items():
                a, b = np.array(want_grads[k], np.float64), np.array(g, np.float64)
                np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * max(np.abs(a).max(), 1e-3),
                                           err_msg=f"{family} {loss_type}: {name}: {k}")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_greedy_rollout_with_the_cache_decodes_as_without_one(adapted, family):
    model = adapted(family)
    if family == "gemma2":  # mlx-lm's gemma2 attention cannot take the batch cache's per-row mask
        assert rollout_problem(model).startswith("gemma2 cannot sample a padded batch of prompts with mlx-lm's batch cache")
        return
    assert rollout_problem(model) is None and rollout_problem(model, fast_decode=True) is None
    prompts = [[3, 17, 42, 99, 5, 250, 7, 33], [8, 9, 61]]  # different lengths: the batched prefill pads
    for fast in (False, True):  # the model's own layers, and compute/decode.py's
        out = sample_groups(model, prompts, 2, SamplingParams(temperature=0.0, max_tokens=8, fast_decode=fast), eos_ids=[])
        for c in out:
            seq = list(prompts[c.prompt_index])
            for _ in range(8):
                seq.append(int(model(mx.array([seq]))[0, -1].argmax()))
            assert c.token_ids == seq[len(prompts[c.prompt_index]):], (family, fast)


@pytest.fixture(scope="module")
def saved(tiny_model_path, tmp_path_factory):
    """Each family as a model folder (with the toy tokenizer), float and 4-bit, made on first use."""
    from tests.support import save_architecture

    root, built = tmp_path_factory.mktemp("architectures"), {}

    def get(family, quantize=False):
        key = (family, quantize)
        if key not in built:
            built[key] = save_architecture(family, root / f"{family}{'-4bit' if quantize else ''}", tiny_model_path, quantize)
        return built[key]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_dora_and_qlora_train_a_step_then_fuse_and_generate(saved, tiny_data_path, tmp_path, family, capsys):
    from mlx_dpo.config import ConfigError, load_config
    from mlx_dpo.fuse import main as fuse_main
    from mlx_dpo.generate import main as generate_main
    from mlx_dpo.lora import run

    def train(kind, model, out):
        run(load_config(["--model", str(model), "--data", str(tiny_data_path), "--adapter-path", str(out), "--train",
                         "--iters", "1", "--batch-size", "2", "--num-layers", "-1", "--val-batches", "0",
                         "--fine-tune-type", "dora" if kind == "dora" else "lora", "--max-seq-length", "64"]))
        return out

    for kind in ("lora", "dora", "qlora"):
        model = saved(family, quantize=kind == "qlora")
        if kind == "dora" and family in ("qwen3_moe", "qwen3_next", "gpt_oss", "deepseek_v3"):
            with pytest.raises(ConfigError, match=f"fine_tune_type dora cannot adapt {family}: SwitchLinear doesn't support DoRA"):
                train(kind, model, tmp_path / kind)
            continue
        out = train(kind, model, tmp_path / kind)
        assert (out / "adapters.safetensors").is_file(), f"{family} {kind}"
    fuse_main(["--model", str(saved(family)), "--adapter-path", str(tmp_path / "lora"), "--save-path", str(tmp_path / "fused")])
    adapted_model, tokenizer = load(str(saved(family)), adapter_path=str(tmp_path / "lora"))
    fused, _ = load(str(tmp_path / "fused"))
    ids = mx.array([tokenizer.encode("hello there")])
    np.testing.assert_allclose(np.array(fused(ids)), np.array(adapted_model(ids)), atol=1e-4, err_msg=family)
    answer = generate_main(["--model", str(tmp_path / "fused"), "--prompt", "hello", "--max-tokens", "4", "--ignore-chat-template"])
    steps = list(stream_generate(fused, tokenizer, tokenizer.encode("hello"), max_tokens=4))
    assert answer.strip() == "".join(s.text for s in steps).strip() != "", family  # the fused model's greedy answer
    seq = tokenizer.encode("hello")
    for _ in range(4):  # which is its greedy decoding without a cache
        seq.append(int(fused(mx.array([seq]))[0, -1].argmax()))
    assert [s.token for s in steps] == seq[-4:], family


def support_table() -> str:
    """LORA.md's support table, computed from the checks the tests above make (not written by hand)."""
    from mlx_dpo.gguf.families import BY_ARCH, FAMILIES as GGUF_FAMILIES

    moe_dora = "SwitchLinear"
    rows = ["| family | LoRA / QLoRA | DoRA | split / packed head | prompt sharing | CPU streams | GRPO rollout | GGUF in / out |",
            "|---|---|---|---|---|---|---|---|"]
    yes, no = "yes", "no"
    for family in FAMILIES:
        model = tiny_architecture(family)
        model.freeze()
        try:
            linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 1.0, "dropout": 0.0}, use_dora=True)
            dora = yes
        except ValueError as e:
            dora = "no (expert layers)" if moe_dora in str(e) else no
        sharing = sharing_problem(tiny_architecture(family))
        sharing = yes if sharing is None else "no (attention mask)" if "attention layers" in sharing else "no (Mamba2 state)"
        gguf_in = any(f.model_type == family for f in BY_ARCH.values())
        gguf = f"{yes if gguf_in else no} / {yes if family in GGUF_FAMILIES else no}"
        rows.append(f"| {family} | {yes} | {dora} | {yes if split_head(model) is not None else no} | {sharing} | {yes} | "
                    f"{yes if rollout_problem(tiny_architecture(family)) is None else no} | {gguf} |")
    return "\n".join(rows)


def test_the_support_table_in_lora_md_is_what_the_checks_find():
    from tests.support import ROOT

    text = (ROOT / "LORA.md").read_text()
    begin, end = "<!-- support table: tests/compute/test_architectures.py -->\n", "\n<!-- end of support table -->"
    assert begin in text and end in text
    table = text[text.index(begin) + len(begin):text.index(end)]
    assert table == support_table(), "regenerate with: python -m tests.compute.test_architectures"


if __name__ == "__main__":
    print(support_table())

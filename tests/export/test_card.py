"""The model card written beside what leaves (a fused model, a PEFT adapter, a GGUF, the mlx-lm
adapters), and the Hub upload path, checked without the network: the calls ``huggingface_hub.HfApi``
receives, with the real ``CommitOperationAdd`` objects it would send."""

import json

import pytest
from huggingface_hub import CommitOperationAdd

from mlx_dpo.config import load_config
from mlx_dpo.export import card
from mlx_dpo.fuse import main as fuse_main
from mlx_dpo.lora import run


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records each call, and the folder's files at upload time."""

    calls: list = []

    def create_repo(self, **kw):
        FakeHub.calls.append(("create_repo", kw))

    def create_commit(self, **kw):
        ops = kw.pop("operations")
        assert all(isinstance(op, CommitOperationAdd) and op.upload_info.size > 0 for op in ops)
        FakeHub.calls.append(("create_commit", {**kw, "files": [op.path_in_repo for op in ops]}))


def test_a_card_is_written_and_the_folder_uploaded_with_it(tiny_model_path, tiny_data_path, tmp_path, monkeypatch):
    out = tmp_path / "ad"
    run(load_config(["--model", str(tiny_model_path), "--data", str(tiny_data_path), "--adapter-path", str(out), "--train",
                     "--test", "--iters", "2", "--batch-size", "2", "--num-layers", "-1", "--val-batches", "1",
                     "--steps-per-eval", "2", "--test-batches", "2"], overrides={"loss_type": "ipo", "beta": 0.3}))
    monkeypatch.setattr(card, "HfApi", FakeHub)
    FakeHub.calls = []
    fuse_main(["--model", str(tiny_model_path), "--adapter-path", str(out), "--export-peft", str(tmp_path / "peft"),
               "--upload-repo", "someone/tiny-ipo"])
    text = (tmp_path / "peft" / "README.md").read_text()
    test_loss = json.loads((out / "test_metrics.json").read_text())["loss"]
    assert f"base_model: {tiny_model_path}" in text and "method `offline_dpo`, objective `ipo`" in text
    assert "- `beta`: `0.3`" in text and f"| test |  | {test_loss:.4g} |" in text
    assert "| train | 2 |" in text and "| valid |" in text and "PeftModel.from_pretrained" in text
    assert [c[0] for c in FakeHub.calls] == ["create_repo", "create_commit"]
    assert FakeHub.calls[0][1] == {"repo_id": "someone/tiny-ipo", "repo_type": "model", "exist_ok": True}
    assert FakeHub.calls[1][1]["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    FakeHub.calls = []
    fuse_main(["--model", str(tiny_model_path), "--adapter-path", str(out), "--save-path", str(tmp_path / "fused")])
    assert FakeHub.calls == [] and "mlx_lm.generate --model ." in (tmp_path / "fused" / "README.md").read_text()
    # The GGUF alone: the file, its Modelfile and its card as the repository's README.md.
    fuse_main(["--model", str(tiny_model_path), "--adapter-path", str(out), "--save-path", str(tmp_path / "fused"),
               "--export-gguf", str(tmp_path / "g" / "m.gguf"), "--ollama", "--upload-repo", "someone/g", "--upload", "gguf"])
    assert FakeHub.calls[-1][1]["files"] == ["Modelfile", "README.md", "m.gguf"]
    assert "tags: [gguf, mlx, mlx-dpo, offline-dpo]" in (tmp_path / "g" / "m.md").read_text()
    # The mlx-lm adapters as they are: no fusing, no checkpoints.
    (out / "0000001_adapters.safetensors").write_bytes((out / "adapters.safetensors").read_bytes())
    fuse_main(["--model", str(tiny_model_path), "--adapter-path", str(out), "--upload-repo", "someone/a", "--upload", "adapters"])
    assert FakeHub.calls[-1][1]["files"] == ["README.md", "adapter_config.json", "adapters.safetensors"]
    assert f"mlx_lm.generate --model {tiny_model_path} --adapter-path ." in (out / "README.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--upload", "gguf"], "--upload chooses what --upload-repo sends: add --upload-repo NAME"),
    (["--upload-repo", "a/b", "--upload", "gguf"], "--upload gguf sends the GGUF output: add --export-gguf"),
    (["--upload-repo", "a/b", "--upload", "fused", "--export-peft", "p"], "--export-peft writes only the PEFT adapter"),
])
def test_an_upload_of_what_was_not_written_is_refused_in_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit):
        fuse_main(["--model", "m", "--adapter-path", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1

"""The model card written beside what leaves (a fused model, a PEFT adapter), and the Hub upload
path, checked without the network: the calls ``huggingface_hub.HfApi`` receives."""

import json

from mlx_dpo.config import load_config
from mlx_dpo.export import card
from mlx_dpo.fuse import main as fuse_main
from mlx_dpo.lora import run


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records each call, and the folder's files at upload time."""

    calls: list = []

    def create_repo(self, **kw):
        FakeHub.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        from pathlib import Path

        FakeHub.calls.append(("upload_folder", {**kw, "files": sorted(p.name for p in Path(kw["folder_path"]).iterdir())}))


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
    assert [c[0] for c in FakeHub.calls] == ["create_repo", "upload_folder"]
    assert FakeHub.calls[0][1] == {"repo_id": "someone/tiny-ipo", "repo_type": "model", "exist_ok": True}
    assert FakeHub.calls[1][1]["folder_path"] == str(tmp_path / "peft") and "README.md" in FakeHub.calls[1][1]["files"]
    FakeHub.calls = []
    fuse_main(["--model", str(tiny_model_path), "--adapter-path", str(out), "--save-path", str(tmp_path / "fused")])
    assert FakeHub.calls == [] and "mlx_lm.generate --model ." in (tmp_path / "fused" / "README.md").read_text()

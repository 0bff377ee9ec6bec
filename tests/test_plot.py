"""``mlx_dpo.plot``: metrics.jsonl drawn as a PNG."""

import json
import struct
import sys

import pytest

pytest.importorskip("matplotlib")

from mlx_dpo import plot  # noqa: E402
from mlx_dpo.train.metrics_log import MetricsLogger  # noqa: E402

PAIR = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
FOUR = ["Loss", "Reward accuracy", "Reward margin", "Chosen / rejected rewards"]


def records(keys=PAIR, train=True, eval=True, steps=(0, 10, 20, 30)):
    out = []
    for s in steps:
        if train and s:
            out.append({"step": s, "split": "train", "loss": 0.7 - 0.01 * s, **{k: 0.01 * s for k in keys}})
        if eval and s % 20 == 0:
            out.append({"step": s, "split": "eval", "eval_loss": 0.7 - 0.01 * s, **{f"eval_{k}": 0.01 * s for k in keys}})
    return out


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_png_written_with_expected_size(tmp_path):
    out = plot.plot_metrics(records(), tmp_path / "sub" / "m.png", title="run — dpo")
    assert out == tmp_path / "sub" / "m.png"
    assert png_size(out) == (plot.WIDTH * plot.DPI, plot.HEIGHT * plot.DPI)


def test_dpo_has_four_panels_with_train_and_eval():
    assert plot.panel_names(records()) == FOUR
    fig = plot.make_figure(records(), "t")
    assert titles(fig) == FOUR
    labels = [line.get_label() for line in fig.axes[3].get_lines()]
    assert {"chosen (train)", "chosen (eval)", "rejected (train)", "rejected (eval)"} <= set(labels)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train", "eval"]
    assert fig._suptitle.get_text() == "t"


def test_series_reads_the_eval_prefix_and_sorts():
    recs = records()[::-1]
    assert plot.series(recs, "loss", "eval") == ([0, 20], [0.7, pytest.approx(0.5)])
    assert plot.series(recs, "loss", "train")[0] == [10, 20, 30]


def test_sft_only_plots_the_loss_alone(tmp_path):
    recs = records(keys=[])
    assert plot.panel_names(recs) == ["Loss"]
    assert titles(plot.make_figure(recs)) == ["Loss"]
    assert png_size(plot.plot_metrics(recs, tmp_path / "sft.png")) == (plot.WIDTH * plot.DPI, plot.HEIGHT * plot.DPI)


def test_kto_marks_accuracy_not_logged(tmp_path):
    recs = records(keys=["rewards/chosen", "rewards/rejected", "rewards/margins", "kl"])
    assert plot.panel_names(recs) == ["Loss", "Reward margin", "Chosen / rejected rewards"]
    fig = plot.make_figure(recs)
    assert titles(fig) == FOUR
    assert any("not logged" in t.get_text() for t in fig.axes[1].texts)
    plot.plot_metrics(recs, tmp_path / "kto.png")


def test_eval_only_and_single_points(tmp_path):
    assert plot.panel_names(records(train=False)) == FOUR
    plot.plot_metrics(records(train=False), tmp_path / "e.png")
    plot.plot_metrics(records(steps=(0, 10)), tmp_path / "one.png")  # one train point, one eval point


def test_cli_on_a_logged_run(tmp_path, capsys):
    import mlx.core as mx

    log = MetricsLogger(tmp_path / "myrun")
    log.on_val_loss_report({"iteration": 0, "val_loss": mx.array(0.69), "val_time": 1.0, "val_rewards/margins": mx.array(0.0)})
    log.on_train_loss_report({"iteration": 10, "train_loss": mx.array(0.5), "rewards/margins": mx.array(0.3), "learning_rate": 1e-5})
    (tmp_path / "myrun" / "adapter_config.json").write_text(json.dumps({"loss_type": ["sigmoid", "sft"]}))
    assert plot.main([str(tmp_path / "myrun")]) is None
    assert png_size(tmp_path / "myrun" / "metrics.png")
    assert plot.run_title(tmp_path / "myrun") == "myrun — sigmoid + sft"
    plot.main([str(tmp_path / "myrun"), "--out", str(tmp_path / "x.png")])
    assert (tmp_path / "x.png").is_file()


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_cli_missing_or_empty_metrics_exits_2(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl" in err
    assert not (tmp_path / "metrics.png").exists()


def test_cli_without_matplotlib_exits_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install matplotlib' in err


def test_grpo_run_gets_the_online_panels(tmp_path):
    from mlx_dpo.plot import panel_names, plot_metrics

    records = [{"step": i, "split": "train", "loss": 0.0, "reward": i / 10, "entropy": 0.8, "kl": 0.01 * i,
                "completions/mean_length": 18.0} for i in range(1, 6)]
    records.append({"step": 5, "split": "eval", "eval_loss": 0.0, "eval_reward": 0.6})
    assert panel_names(records) == ["Loss", "Reward", "KL from the reference / entropy", "Completion length"]
    out = plot_metrics(records, tmp_path / "m.png")
    assert out.stat().st_size > 10_000

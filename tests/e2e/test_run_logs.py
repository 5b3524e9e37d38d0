"""Each training run has its own logs (a rerun does not append to the last one's); `imglora demo` says where
everything is and how to open it."""

import json
import shlex

import pytest

from helpers import train_flags
from imglora.cli import main
from imglora.synthetic.shapes import synth_shapes
from imglora.train.samples import RunLog


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_new_run_moves_the_last_runs_logs_aside_and_a_resumed_one_continues(tmp_path):
    logs = tmp_path / "logs"
    first = RunLog(logs, True)
    first.log(1, loss=1.0)
    first.close()
    second = RunLog(logs, True)
    second.log(1, loss=0.5)
    second.close()
    old = sorted(logs.glob("train-*.jsonl"))
    assert len(old) == 1 and [r["loss"] for r in rows(old[0])] == [1.0]
    assert [r["loss"] for r in rows(logs / "train.jsonl")] == [0.5]
    stamp = old[0].name[len("train-"):-len(".jsonl")]
    assert (logs / f"tensorboard-{stamp}").is_dir() and (logs / "tensorboard").is_dir()  # one TensorBoard run each
    resumed = RunLog(logs, True, resume=True)
    resumed.log(2, loss=0.25)
    resumed.close()
    assert [r["loss"] for r in rows(logs / "train.jsonl")] == [0.5, 0.25]
    assert sorted(logs.glob("train-*.jsonl")) == old
    third = RunLog(logs, True)  # within the same second as the second run's last write: a distinct name
    third.close()
    assert len(list(logs.glob("train-*.jsonl"))) == 2 and len(list(logs.glob("tensorboard-*"))) == 2
    RunLog(tmp_path / "other", False).close()  # not the main process: nothing at all
    assert not (tmp_path / "other").exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from imglora.models.tiny import tiny_sd_pipeline

    d = tmp_path_factory.mktemp("model")
    tiny_sd_pipeline(d / "tok").save_pretrained(d / "sd1")
    return d / "sd1"


def test_training_twice_into_one_output_keeps_both_logs_apart(model_dir, tmp_path):
    data = tmp_path / "shapes"
    synth_shapes(data, 4, seed=1, size=32)
    out = tmp_path / "run"
    for steps in (3, 2):
        assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--steps",
                     str(steps), "--overwrite", *train_flags()]) == 0
    old = list((out / "logs").glob("train-*.jsonl"))
    assert len(old) == 1
    assert [r["step"] for r in rows(old[0]) if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows(out / "logs" / "train.jsonl") if "loss" in r] == [1, 2]


def test_demo_ends_with_where_everything_is_and_the_commands_to_open_it(tmp_path, monkeypatch, capsys):
    import imglora.synthetic.demo as demo

    out = tmp_path / "my demo"

    def fake_run_demo(output, seed, steps):
        return {"adapter": f"{output}/zorbly.safetensors", "grid": f"{output}/before-after.png",
                "logs": f"{output}/logs", "concept_before": 0.0, "concept_after": 0.83, "base_before": 1.0,
                "base_after": 1.0, "base_change": 0.0}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "concept_before=0.00 concept_after=0.83 base_change=+0.00"
    assert lines[1:5] == [f"before/after image: {out}/before-after.png",
                          f"adapter:            {out}/zorbly.safetensors",
                          f"training logs:      {out}/logs", "to look at them:"]
    commands = [line.split("  #")[0].strip() for line in lines[5:]]
    assert commands == [f"imglora ui --adapters {shlex.quote(str(out))}",
                        f"tensorboard --logdir {shlex.quote(str(out) + '/logs')}",
                        f"imglora demo --ui --output {shlex.quote(str(out))}"]
    assert shlex.split(commands[0])[-1] == str(out)  # pastes into a shell as one word, space and all

"Experiment trackers through accelerate (issue 18.4): every metrics record and the eval grids reach TensorBoard, read back offline."
import io, math, struct
from pathlib import Path
import pytest
from PIL import Image
from apex_nb.config import make_config
from apex_nb.grpo import GRPOTrainer
from apex_nb.runs import read_metrics

TINY = dict(steps=2, group_size=2, groups_per_step=2, sample_steps=2, eval_sample_steps=2, eval_every=1, save_every=0, conflict_every=1)


def read_events(folder: Path) -> list:
    "Every event of the TensorBoard files under `folder` (TFRecord framing: length, its CRC, the Event proto, its CRC)."
    from tensorboardX.proto import event_pb2
    events = []
    for f in sorted(folder.rglob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8]); i += 12
            ev = event_pb2.Event(); ev.ParseFromString(data[i:i + n]); i += n + 4
            events.append(ev)
    return events


def scalars(events) -> dict:
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}


def test_tensorboard_gets_every_record_and_the_eval_grids(tmp_path):
    out = tmp_path / "run"
    tr = GRPOTrainer(make_config("tiny-random", **TINY, out_dir=str(out), log_with="tensorboard", tracker_options={"tensorboard": {"flush_secs": 1}}))
    tr.train()
    events = read_events(out / "trackers")
    got = scalars(events)
    recs = read_metrics(out)
    steps, evals = [r for r in recs if "eval" not in r], [r for r in recs if "eval" in r]
    assert len(steps) == 2 and [r["step"] for r in evals] == [0, 1, 2]
    for r in steps:                                          # every number of every step record, at its step (float32 in the file)
        for k in ("loss", "kl", "grad_norm", "weight/ocr", "share/brisque", "raw_mean/colorfulness"):
            assert math.isclose(got[(k, r["step"])], r[k], rel_tol=1e-6, abs_tol=1e-30), k
    for r in evals:
        for n, v in r["eval"].items(): assert math.isclose(got[(f"eval/{n}", r["step"])], v, rel_tol=1e-6, abs_tol=1e-30)
    images = [(e.step, v.image) for e in events for v in e.summary.value if v.HasField("image")]
    assert sorted(s for s, _ in images) == [0, 1, 2]        # one grid per evaluation
    grid = Image.open(io.BytesIO(images[0][1].encoded_image_string))
    assert grid.size == Image.open(out / "eval" / "step-000000.png").size
    hparams = [v.tag for e in events for v in e.summary.value if "hparams" in v.tag]
    assert hparams, "the config is stored as hyperparameters"


def test_no_tracker_by_default_and_bad_names_refused_before_loading(tmp_path):
    tr_cfg = make_config("tiny-random", **TINY, out_dir=str(tmp_path / "a"))
    assert tr_cfg.log_with is None
    with pytest.raises(ValueError, match="unknown tracker in log_with 'tensorbord'"):
        GRPOTrainer(make_config("tiny-random", **TINY, out_dir=str(tmp_path / "b"), log_with="tensorbord"))
    assert not (tmp_path / "b").exists()

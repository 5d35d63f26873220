import numpy as np
import pytest

from unimodal.data_pipelines.tasks import TASKS, BadSample, get_task
from unimodal.tokenizers.vocab import EOS, SEP, SPECIAL_ID

from unimodal.data_pipelines.loader import decode_sample

from conftest import make_samples as _make_samples


def make_samples(n):
    """The fixture samples as the loader hands them to tasks (members decoded)."""
    import json
    return [decode_sample({**s, "json": json.dumps(s["json"]).encode()}) for s in _make_samples(n)]


def test_every_registered_task_has_an_instruction_and_output_range(toks):
    for name, task in TASKS.items():
        assert task.instruction and task.output in ("text", "code", "action", "value")
        lo, hi = toks.vocab.range(task.output)
        assert hi > lo
    assert TASKS["image.classify.fr"].held_out and not TASKS["image.classify"].held_out
    # a control task's range is its action space's: the environment's, never its name's
    assert TASKS["control.pendulum-v1"].output == "action"
    assert not TASKS["control.pendulum-v1"].action_space(toks).discrete
    assert TASKS["control.cartpole-v1"].action_space(toks).n == 2
    with pytest.raises(KeyError, match="unknown task"):
        get_task("image.segment")


@pytest.mark.parametrize("i", range(4))
def test_sample_layout_loss_on_answer_only(toks, i):
    sample = make_samples(5)[i]
    task = get_task(sample["json"]["task"])
    spans = task.to_spans(sample, toks)
    assert spans[0].ids.tolist() == [SPECIAL_ID["<bos>"]]
    targets = [s for s in spans if s.is_target]
    assert targets[-1].ids.tolist() == [EOS]
    # everything up to and including <sep> is prompt, the rest is answer
    sep = next(k for k, s in enumerate(spans) if s.discrete and s.ids.tolist() == [SEP])
    assert not any(s.is_target for s in spans[:sep + 1]) and all(s.is_target for s in spans[sep + 1:])
    answer = (toks.code if task.output == "code" else toks.text).decode(targets[0].ids)
    assert answer == task.answer(sample)


def test_control_follows_gato_layout(toks):
    sample = make_samples(5)[4]
    task = get_task("control.cartpole-v1")
    rng = np.random.default_rng(0)
    spans = task.to_spans(sample, toks, rng, max_len=64)
    assert sum(len(s) for s in spans) <= 64
    steps = spans[2:]
    assert len(steps) % 3 == 0
    for obs, sep, act in zip(steps[::3], steps[1::3], steps[2::3]):
        assert obs.modality == "value" and len(obs) == 4 and not obs.is_target
        assert sep.ids.tolist() == [SEP]
        assert act.modality == "action" and act.is_target and len(act) == 1
        lo, hi = toks.vocab.range("action")
        assert lo <= act.ids[0] < hi


def test_continuous_actions_use_value_bins_with_action_modality(toks):
    task = get_task("control.pendulum-v1")
    span = task.action_span(np.array([1.5], dtype=np.float32), toks)
    assert span.modality == "action" and span.is_target
    lo, hi = toks.vocab.range("value")
    assert lo <= span.ids[0] < hi
    assert abs(toks.value.decode(span.ids)[0] - 1.5) < 0.05


@pytest.mark.parametrize("broken,reason", [
    ({"json": {"task": "text.translate.en-fr", "src": "", "tgt": "x"}}, "missing_field"),
    ({"json": {"task": "image.classify", "label": "one"}, "png": b"not an image"}, "bad_image"),
    ({"json": {"task": "audio.transcribe", "transcript": "one"}, "flac": b"RIFFxxxx"}, "bad_audio"),
    ({"json": {"task": "image.classify", "label": "one"}}, "missing_member"),
    ({"json": {"task": "control.cartpole-v1"}, "obs.npy": np.zeros((3, 4))}, "missing_member"),
])
def test_bad_samples_raise_badsample_with_a_reason(toks, broken, reason):
    with pytest.raises(BadSample) as e:
        get_task(broken["json"]["task"]).to_spans(broken, toks)
    assert e.value.reason == reason

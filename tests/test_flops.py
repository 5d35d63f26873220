"""FLOPs and the peak behind MFU: ``Decoder.flops_per_step`` against torch's FlopCounterMode on
a real training step, what the throughput callback counts per batch, and the cached CPU peak."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from unimodal import bench
from unimodal import module as um
from unimodal.data_pipelines.packing import IGNORE, Batch
from unimodal.module import ThroughputCallback, UnimodalModule, device_peak_flops

TEXT, IMAGE = 1, 3  # modality indices, as in tokenizers.base.MODALITIES
# the head (2,048 x 64) outweighs the blocks, so where it is counted decides the total
CFG = dict(vocab_size=2048, n_layer=2, n_head=4, d_model=64, max_seq_len=128, attention="math",
           continuous={"image": 48}, max_coord=8)


def answer_batch(B: int = 2, T: int = 128, samples: int = 4, answer: int = 8, pad: int = 0) -> Batch:
    """``samples`` packed samples per row, each with targets at its last ``answer`` positions
    only (a prompt, then the answer); 12 image patches in row 0; ``pad`` padding positions
    at the end of row 1."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG["vocab_size"], (B, T), generator=g)
    L = T // samples
    sample_ids = (torch.arange(T) // L).repeat(B, 1)
    positions = (torch.arange(T) % L).repeat(B, 1)
    targets = torch.full((B, T), IGNORE)
    answers = (positions >= L - answer - 1) & (positions < L - 1)  # the last position predicts nothing
    targets[:, :-1] = torch.where(answers[:, :-1], ids[:, 1:], IGNORE)
    modality = torch.full((B, T), TEXT)
    img = torch.arange(2, 14)
    modality.view(-1)[img] = IMAGE
    if pad:
        sample_ids[1, -pad:], targets[1, -pad:] = -1, IGNORE
    rc = torch.stack([torch.arange(12) // 4, torch.arange(12) % 4], -1)
    return Batch(ids=ids, modality=modality, positions=positions, sample_ids=sample_ids, targets=targets,
                 weights=(targets != IGNORE).float(), task=torch.zeros(B, T, dtype=torch.long),
                 features={"image": torch.randn(12, 48, generator=g)}, feature_index={"image": img},
                 coords={"image": rc}, num_samples=B * samples)


def tiny_module() -> UnimodalModule:
    torch.manual_seed(0)
    module = UnimodalModule(model=CFG, optim={}, tasks=["t"])
    module.configure_model()
    return module


def test_flops_per_step_matches_flop_counter_on_a_training_step():
    """One forward + backward of the training loss (``UnimodalModule._step``: the head at the
    target positions only) under FlopCounterMode, against the formula for that batch; the
    old count (the head at every position) is far off on the same batch."""
    module, batch = tiny_module(), answer_batch()
    B, T = batch.ids.shape
    targets = int((batch.targets != IGNORE).sum())
    assert targets / (B * T) < 0.3
    with FlopCounterMode(display=False) as counter:
        loss = module._step(batch)[-1]
        loss.backward()
    counted = counter.get_total_flops()
    formula = module.flops_per_step(B * T, targets, T, {"image": 12})
    every_position = module.flops_per_step(B * T, B * T, T, {"image": 12})
    assert abs(formula / counted - 1) < 0.05, (formula, counted)
    assert every_position / counted - 1 > 0.05, (every_position, counted)


def test_flops_per_step_terms():
    model = tiny_module().model
    c = model.cfg
    head = c.vocab_size * c.d_model
    body = model.num_params(non_embedding=True) - head - 48 * c.d_model
    assert model.flops_per_step(10, 3, 128) == 6 * body * 10 + 6 * head * 3 + 12 * c.n_layer * c.d_model * 128 * 10
    assert model.flops_per_step(10, 3, 128, {"image": 5}) - model.flops_per_step(10, 3, 128) == 4 * 48 * c.d_model * 5


def test_callback_counts_each_batch_by_its_tokens_and_targets():
    """The callback adds ``flops_per_step`` of the batch's non-padding positions and targets;
    nothing is left to a fixed per-token figure."""
    module, batch = tiny_module(), answer_batch(pad=20)
    cb = ThroughputCallback()
    cb.on_train_start(SimpleNamespace(world_size=1), module)
    trainer = SimpleNamespace(accumulate_grad_batches=2)  # the first micro-batch: counted, not yet metered
    cb.on_train_batch_end(trainer, module, None, batch, 0)
    B, T = batch.ids.shape
    targets = int(((batch.targets != IGNORE) & (batch.weights != 0)).sum())
    assert cb.tokens == B * T - 20
    assert cb.step_flops == module.flops_per_step(B * T - 20, targets, T, {"image": 12})


@pytest.fixture
def peaks(tmp_path, monkeypatch):
    """The peak cache in tmp_path, this process's memo empty, and a fake measurement that
    counts its calls: ``peaks.value`` is what it returns, ``peaks.calls`` how often it ran."""
    path = tmp_path / "cache" / "peak_flops.json"
    monkeypatch.setenv(um.PEAK_CACHE_ENV, str(path))
    monkeypatch.delenv(um.PEAK_FLOPS_ENV, raising=False)
    monkeypatch.setattr(um, "_PEAK_CACHE", {})
    state = SimpleNamespace(path=path, value=1.25e11, calls=0)

    def measure(dtype, *args, **kwargs):
        state.calls += 1
        return state.value

    monkeypatch.setattr(um, "measure_matmul_flops", measure)
    monkeypatch.setattr(bench, "OtherLoad", lambda: lambda: state.busy)
    state.busy = 0.0  # cores other processes kept busy while it measured
    return state


def test_cpu_peak_is_measured_once_then_read_from_the_cache(peaks, monkeypatch):
    cpu = torch.device("cpu")
    peak, source = device_peak_flops(cpu, torch.bfloat16)
    assert peak == 1.25e11 and source == f"measured now, cached in {peaks.path}"
    (key, entry), = json.loads(peaks.path.read_text()).items()
    assert f"{torch.get_num_threads()} threads, bfloat16" in key and entry["flops"] == 1.25e11
    # a later run (a new process: empty memo) on a machine that now measures otherwise
    monkeypatch.setattr(um, "_PEAK_CACHE", {})
    peaks.value = 3e11
    peak, source = device_peak_flops(cpu, torch.bfloat16)
    assert peak == 1.25e11 and source.startswith(f"cached measurement of {entry['date']}") and peaks.calls == 1
    # another dtype is another entry; the first stays
    assert device_peak_flops(cpu, torch.float32) == (3e11, f"measured now, cached in {peaks.path}")
    assert len(json.loads(peaks.path.read_text())) == 2 and peaks.calls == 2


def test_peak_override_and_a_broken_cache(peaks, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(um.PEAK_FLOPS_ENV, "4.5e11")
    assert device_peak_flops(cpu, torch.bfloat16) == (4.5e11, "override ($UNIMODAL_PEAK_FLOPS)")
    assert peaks.calls == 0 and not peaks.path.exists()
    monkeypatch.setenv(um.PEAK_FLOPS_ENV, "fast")
    with pytest.raises(ValueError, match="UNIMODAL_PEAK_FLOPS must be FLOP/s as a number"):
        device_peak_flops(cpu, torch.bfloat16)
    monkeypatch.delenv(um.PEAK_FLOPS_ENV)
    peaks.path.parent.mkdir(parents=True)
    peaks.path.write_text("{not json")
    assert device_peak_flops(cpu, torch.bfloat16)[0] == 1.25e11 and peaks.calls == 1
    assert len(json.loads(peaks.path.read_text())) == 1  # rewritten whole


def test_measure_matmul_flops_runs_for_its_time():
    assert um.measure_matmul_flops(torch.float32, n=64, seconds=0.05, min_repeats=3) > 0


def test_a_peak_measured_under_load_is_not_cached(peaks):
    peaks.busy = 1.5
    peak, source = device_peak_flops(torch.device("cpu"), torch.bfloat16)
    assert peak == 1.25e11 and "not cached: other processes kept 1.5 cores busy" in source
    assert not peaks.path.exists()

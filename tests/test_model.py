"""Tests of unimodal/model.py: masking, continuous inputs, KV cache, losses, sizes, compile."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from unimodal.config import model_preset
from unimodal.model import Decoder, KVCache, ModelConfig, param_groups, token_loss

IMAGE, AUDIO, TEXT, CODE, ACTION = 3, 4, 1, 2, 6  # modality indices, as in tokenizers.base.MODALITIES


def tiny(**overrides) -> ModelConfig:
    kw = dict(vocab_size=128, n_layer=2, n_head=4, d_model=64, max_seq_len=64,
              continuous={"image": 16, "audio": 20}, max_coord=8)
    kw.update(overrides)
    return ModelConfig(**kw)


def make_model(seed=0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(tiny(**overrides)).eval()


def plain_inputs(B=2, T=24, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    modality = torch.full((B, T), TEXT)
    positions = torch.arange(T).expand(B, T)
    return ids, modality, positions


def mixed_batch(B=2, T=32, seed=2):
    """Discrete ids of several modalities plus image patches (row 0) and audio frames (row 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (B, T), generator=g)
    modality = torch.full((B, T), TEXT)
    modality[:, 20:26] = CODE
    modality[:, 26:] = ACTION
    img_pos = torch.arange(4, 13)  # 9 patches of a 3x3 grid in row 0
    aud_pos = T + torch.arange(2, 14)  # 12 frames in row 1 (flat index into B*T)
    modality.view(-1)[img_pos] = IMAGE
    modality.view(-1)[aud_pos] = AUDIO
    features = {"image": torch.randn(9, 16, generator=g), "audio": torch.randn(12, 20, generator=g)}
    feature_index = {"image": img_pos, "audio": aud_pos}
    rc = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij"), -1).reshape(9, 2)
    coords = {"image": rc, "audio": torch.stack([torch.arange(12), torch.zeros(12, dtype=torch.long)], -1)}
    positions = torch.arange(T).expand(B, T)
    return dict(ids=ids, modality=modality, positions=positions, features=features,
                feature_index=feature_index, coords=coords)


def changed(a, b, tol=1e-6):
    return (a - b).abs().max().item() > tol


def same(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@torch.no_grad()
def test_causality():
    model = make_model()
    ids, modality, positions = plain_inputs()
    base = model(ids, modality, positions)
    assert base.shape == (2, 24, 128) and base.dtype == torch.float32
    ids2 = ids.clone()
    ids2[:, 15] = (ids2[:, 15] + 1) % 128
    out = model(ids2, modality, positions)
    same(out[:, :15], base[:, :15])
    assert changed(out[:, 15:], base[:, 15:])


@torch.no_grad()
def test_packing_isolation():
    model = make_model()
    a, b = torch.randint(0, 128, (1, 9)), torch.randint(0, 128, (1, 15))
    ids = torch.cat([a, b], 1)  # (1, 24): two samples in one row
    modality = torch.full_like(ids, TEXT)
    positions = torch.cat([torch.arange(9), torch.arange(15)])[None]
    sample_ids = torch.cat([torch.zeros(9), torch.ones(15)]).long()[None]
    packed = model(ids, modality, positions, sample_ids)
    # each sample's logits are those of the sample alone in its own row
    alone_a = model(a, modality[:, :9], positions[:, :9])
    alone_b = model(b, modality[:, 9:], positions[:, 9:])
    torch.testing.assert_close(packed[:, :9], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 9:], alone_b, atol=1e-5, rtol=0)
    # changing one sample never changes the other's logits
    ids2 = ids.clone()
    ids2[:, 9:] = (ids2[:, 9:] + 7) % 128
    out = model(ids2, modality, positions, sample_ids)
    same(out[:, :9], packed[:, :9])
    assert changed(out[:, 9:], packed[:, 9:])
    ids3 = ids.clone()
    ids3[:, :9] = (ids3[:, :9] + 7) % 128
    out = model(ids3, modality, positions, sample_ids)
    same(out[:, 9:], packed[:, 9:])
    assert changed(out[:, :9], packed[:, :9])


@pytest.mark.parametrize("packed", [True, False])
def test_math_attention_equals_sdpa(packed):
    """The math kernel (attention="math") gives SDPA's logits and gradients, packed or causal, with GQA."""
    batch = mixed_batch()
    if packed:
        batch["sample_ids"] = (torch.arange(32) >= 13).long().expand(2, 32)
    outs = {}
    for kernel in ("sdpa", "math"):
        model = make_model(n_kv_head=2, attention=kernel).train()
        logits = model(**batch)
        logits.float().square().mean().backward()
        outs[kernel] = (logits, [p.grad for p in model.parameters()])
    torch.testing.assert_close(outs["math"][0], outs["sdpa"][0], atol=1e-5, rtol=0)
    for g_math, g_sdpa in zip(outs["math"][1], outs["sdpa"][1]):
        torch.testing.assert_close(g_math, g_sdpa, atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_sdpa_on_packed_rows():
    """attention="flex" (FlexAttention under a block mask, grouped-query) gives SDPA's logits on
    packed rows of uneven samples; its backward runs on CUDA only and is checked by
    benchmarks/gpu.sh against SDPA there."""
    batch = mixed_batch()
    batch["sample_ids"] = torch.stack([(torch.arange(32) >= 13).long(), (torch.arange(32) // 5)])
    logits = {k: make_model(n_kv_head=2, attention=k)(**batch) for k in ("sdpa", "flex")}
    torch.testing.assert_close(logits["flex"], logits["sdpa"], atol=1e-5, rtol=0)
    compiled = make_model(n_kv_head=2, attention="flex")  # blocks compiled, as trainer.compile does
    for block in compiled.blocks:
        block.compile(dynamic=False)
    # inductor's flex kernel once gave wrong outputs here (v a strided view of the QKV output)
    torch.testing.assert_close(compiled(**batch), logits["sdpa"], atol=1e-5, rtol=0)


def test_flex_attention_builds_a_block_mask_for_packed_rows_only():
    from torch.nn.attention.flex_attention import BlockMask

    sample_ids = (torch.arange(16) >= 7).long()[None]
    flex = make_model(attention="flex")
    assert isinstance(flex.attn_mask(sample_ids, None, 16, "cpu"), BlockMask)  # the mask only: no kernel runs
    assert flex.attn_mask(None, None, 16, "cpu") is None  # plain causal rows: SDPA's is_causal
    assert flex.attn_mask(sample_ids, flex.new_cache(1, 32), 16, "cpu").dtype == torch.bool  # decoding: SDPA
    for kernel in ("auto", "sdpa", "math"):
        assert not make_model(attention=kernel).use_flex()


def test_auto_attention_takes_math_only_for_short_bf16_rows_on_cpu(monkeypatch):
    import unimodal.model as model_mod

    calls = []
    real = model_mod.math_attention
    monkeypatch.setattr(model_mod, "math_attention", lambda *a: calls.append(1) or real(*a))
    model = make_model()  # attention="auto"
    ids, modality, positions = plain_inputs(B=1, T=24)
    with torch.no_grad():
        model(ids, modality, positions)  # fp32: SDPA
        assert not calls
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, modality, positions)  # bf16 on CPU, short row: math, in every layer
            assert len(calls) == 2
            cache = model.new_cache(1, 32, dtype=torch.bfloat16)
            model(ids, modality, positions, kv_cache=cache)  # with a KV cache: SDPA
            assert len(calls) == 2
            monkeypatch.setattr(model_mod, "MATH_ATTENTION_MAX_LEN", 16)
            model(ids, modality, positions)  # longer than the limit: SDPA
            assert len(calls) == 2
    with pytest.raises(ValueError, match="attention must be"):
        tiny(attention="flash")


@torch.no_grad()
def test_value_embedding_adds_a_smooth_function_of_the_bin_to_value_ids_only():
    model = make_model(vocab_size=1100, value_ids=(40, 1064))  # 1,024 value bins, as the demo's
    ids = torch.tensor([[3, 39, 40, 500, 501, 600, 1063, 1064]])
    emb = model.value_embedding(ids)[0]  # (8, d)
    assert torch.all(emb[[0, 1, 7]] == 0)  # not value bins: nothing added
    assert torch.all(emb[2:7].abs().sum(-1) > 0)
    # neighbouring bins start out close, bins 100 apart do not (the id table alone gives no such order)
    assert (emb[3] - emb[4]).norm() < 0.2 * (emb[3] - emb[5]).norm()
    modality = torch.full_like(ids, TEXT)
    with_value = model(ids, modality, torch.arange(8)[None])
    off = make_model(vocab_size=1100)  # value_ids None: no projection at all
    assert off.value_proj is None and not any("value_proj" in n for n, _ in off.named_parameters())
    assert make_model(vocab_size=1100, value_ids=(40, 1064), value_fourier=0).value_proj is None
    assert changed(with_value, off(ids, modality, torch.arange(8)[None]))


def test_value_embedding_gets_gradients():
    model = make_model(vocab_size=128, value_ids=(40, 104)).train()
    ids = torch.randint(40, 104, (2, 16))
    logits = model(ids, torch.full_like(ids, 5), torch.arange(16).expand(2, 16))
    logits.float().square().mean().backward()
    assert model.value_proj.weight.grad is not None and model.value_proj.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_continuous_features_change_only_their_positions_and_later():
    model = make_model()
    batch = mixed_batch()
    base = model(**batch)
    first_img, first_aud = 4, 2  # first image position of row 0, first audio position of row 1
    # new image features: row 0 changes from the first patch on, never before; row 1 not at all
    b2 = dict(batch, features=dict(batch["features"], image=batch["features"]["image"] + 1.0))
    out = model(**b2)
    same(out[0, :first_img], base[0, :first_img])
    assert changed(out[0, first_img:], base[0, first_img:])
    same(out[1], base[1])
    # new audio features: only row 1 from its first frame on
    b3 = dict(batch, features=dict(batch["features"], audio=batch["features"]["audio"] * -1.0))
    out = model(**b3)
    same(out[0], base[0])
    same(out[1, :first_aud], base[1, :first_aud])
    assert changed(out[1, first_aud:], base[1, first_aud:])
    # coords matter too (learned row/col embeddings), and are clamped rather than out of range
    b4 = dict(batch, coords=dict(batch["coords"], image=batch["coords"]["image"].flip(0) + 100))
    out = model(**b4)
    same(out[0, :first_img], base[0, :first_img])
    assert changed(out[0, first_img:], base[0, first_img:])
    # the ids under continuous positions are replaced, so they do not matter
    ids = batch["ids"].clone()
    ids.view(-1)[batch["feature_index"]["image"]] = 0
    ids.view(-1)[batch["feature_index"]["audio"]] = 0
    same(model(**dict(batch, ids=ids)), base)


@torch.no_grad()
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_matches_full_recomputation(n_kv_head):
    model = make_model(n_kv_head=n_kv_head)
    ids, modality, positions = plain_inputs(B=2, T=20)
    full = model(ids, modality, positions)
    cache = model.new_cache(batch_size=2, max_len=32)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 2, n_kv_head, 32, 16)
    steps = [(0, 10), (10, 13)] + [(t, t + 1) for t in range(13, 20)]  # prefill, a chunk, single tokens
    for a, b in steps:
        out = model(ids[:, a:b], modality[:, a:b], positions[:, a:b], kv_cache=cache)
        torch.testing.assert_close(out, full[:, a:b], atol=1e-4, rtol=0)
    assert cache.length == 20


@torch.no_grad()
def test_kv_cache_with_sample_ids_and_features():
    """Left padding as its own sample, an image in the prompt: cached decoding still equals recomputation."""
    model = make_model(n_kv_head=2)
    batch = mixed_batch(B=2, T=24)
    batch["feature_index"] = {"image": torch.arange(4, 13)}
    batch["features"] = {"image": batch["features"]["image"]}
    batch["coords"] = {"image": batch["coords"]["image"]}
    sample_ids = torch.ones(2, 24, dtype=torch.long)
    sample_ids[1, :3] = 0  # row 1 has 3 pad tokens in front
    positions = torch.arange(24).expand(2, 24).clone()
    positions[1] = (positions[1] - 3).clamp(min=0)
    batch.update(sample_ids=sample_ids, positions=positions)
    full = model(**batch)
    cache = model.new_cache(2, 24)
    prefill = dict(batch, ids=batch["ids"][:, :16], modality=batch["modality"][:, :16],
                   positions=positions[:, :16], sample_ids=sample_ids[:, :16])
    torch.testing.assert_close(model(**prefill, kv_cache=cache), full[:, :16], atol=1e-4, rtol=0)
    for t in range(16, 24):
        sl = slice(t, t + 1)
        out = model(batch["ids"][:, sl], batch["modality"][:, sl], positions[:, sl], sample_ids[:, sl],
                    kv_cache=cache)
        torch.testing.assert_close(out, full[:, sl], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="full"):
        model(batch["ids"][:, :1], batch["modality"][:, :1], positions[:, :1], kv_cache=cache)


def test_token_loss_ignores_and_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.bfloat16)
    targets = torch.randint(0, 11, (2, 6))
    targets[0, :2] = -100
    weights = torch.ones(2, 6)
    weights[1, 3] = 0.0
    weights[1, 4] = 0.5
    loss, mask = token_loss(logits, targets, weights)
    assert loss.dtype == torch.float32 and loss.shape == (2, 6) and mask.dtype == torch.bool
    assert not mask[0, :2].any() and not mask[1, 3] and mask.sum() == 9
    assert (loss[~mask] == 0).all()
    ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                          reduction="none").view(2, 6) * weights
    torch.testing.assert_close(loss, ref)
    # weight 0 and -100 targets contribute nothing, whatever the logits there
    logits2 = logits.clone()
    logits2[0, :2] = 50.0
    logits2[1, 3] = -50.0
    torch.testing.assert_close(token_loss(logits2, targets, weights)[0], loss)
    # without weights every non-ignored token counts
    assert token_loss(logits, targets)[1].sum() == 10


def test_z_loss_increases_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 13) + 3.0  # log Z well away from 0
    targets = torch.randint(0, 13, (2, 5))
    plain, mask = token_loss(logits, targets)
    with_z, _ = token_loss(logits, targets, z_loss=1e-2)
    assert (with_z[mask] > plain[mask]).all()
    lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(with_z - plain, 1e-2 * lse.square())


def test_overfits_one_mixed_batch():
    torch.manual_seed(0)
    model = Decoder(tiny(z_loss=1e-4)).train()
    batch = mixed_batch()
    targets = batch["ids"].roll(-1, dims=1)  # next-token targets on discrete positions
    targets[:, -1] = -100
    for m in ("image", "audio"):  # nothing to predict where the next input is continuous
        targets.view(-1)[batch["feature_index"][m] - 1] = -100
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.01), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for step in range(300):
        loss, mask = token_loss(model(**batch), targets, z_loss=model.cfg.z_loss)
        loss = loss.sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1], step)
    # every part got a gradient: the continuous inputs and the row/col embeddings included
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_param_groups_cover_every_parameter_once():
    model = make_model(tie_embeddings=True)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in decay["params"])
    assert id(model.wte.weight) in {id(p) for p in no_decay["params"]}
    assert id(model.blocks[0].attn.qkv.weight) in {id(p) for p in decay["params"]}
    assert id(model.blocks[0].attn.q_norm.weight) in {id(p) for p in no_decay["params"]}


def test_tied_embeddings_counted_once():
    untied, tied = make_model(), make_model(tie_embeddings=True)
    assert tied.head.weight is tied.wte.weight
    assert untied.num_params() - tied.num_params() == 128 * 64
    assert tied.num_params(non_embedding=True) == untied.num_params(non_embedding=True)


@pytest.mark.parametrize("name, lo, hi", [("default", 3e6, 5e6), ("small", 110e6, 160e6),
                                          ("base", 300e6, 420e6), ("1b", 0.9e9, 1.2e9)])
def test_preset_sizes(name, lo, hi):
    with torch.device("meta"):
        model = Decoder(ModelConfig(**model_preset(name)))
    n = model.num_params()
    assert lo <= n <= hi, f"{name}: {n / 1e6:.1f}M"
    n_emb = n - model.num_params(non_embedding=True)
    assert n_emb >= model.cfg.vocab_size * model.cfg.d_model
    T = model.cfg.max_seq_len
    c = model.cfg
    inputs = sum(d * c.d_model for d in c.continuous.values())  # run at continuous positions only
    assert model.flops_per_step(1, 1, T) == 6 * (n - n_emb - inputs) + 12 * c.n_layer * c.d_model * T
    assert model.flops_per_step(1, 0, T) == model.flops_per_step(1, 1, T) - 6 * c.vocab_size * c.d_model


def test_meta_build_then_materialise():
    with torch.device("meta"):
        model = Decoder(tiny())
    model.to_empty(device="cpu")
    model.init_weights()
    ids, modality, positions = plain_inputs()
    assert torch.isfinite(model(ids, modality, positions)).all()


def test_initial_loss_is_near_log_vocab():
    model = make_model()
    batch = mixed_batch()
    with torch.no_grad():
        loss, mask = token_loss(model(**batch), batch["ids"])
    assert abs((loss.sum() / mask.sum()).item() - torch.log(torch.tensor(128.0)).item()) < 0.05


def test_autocast_bf16():
    model = make_model(n_kv_head=2).train()
    batch = mixed_batch()
    batch["sample_ids"] = (torch.arange(32) >= 20).long().expand(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**batch)
        loss, mask = token_loss(logits, batch["ids"], z_loss=1e-4)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(logits.float()).all()
    (loss.sum() / mask.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # cached decoding too
        cache = model.new_cache(2, 40, dtype=torch.bfloat16)
        model(**{k: v for k, v in batch.items() if k != "sample_ids"}, kv_cache=cache)
        out = model(batch["ids"][:, :1], batch["modality"][:, :1], torch.full((2, 1), 32), kv_cache=cache)
    assert out.shape == (2, 1, 128) and torch.isfinite(out.float()).all()


@pytest.mark.slow
def test_torch_compile_forward():
    model = make_model()
    batch = mixed_batch()
    batch["sample_ids"] = (torch.arange(32) >= 20).long().expand(2, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch), model(**batch), atol=1e-5, rtol=1e-5)

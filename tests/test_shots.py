"""Training with demonstrations in context (Gato's prompt conditioning), in the very form
few-shot prompting builds, so that `--shots` meets at prompting time what training showed."""
from __future__ import annotations

from collections import Counter
from itertools import islice

import numpy as np
import pytest

from unimodal.data_pipelines.loader import DataConfig, Neighbours, StreamDataset, decode_sample
from unimodal.data_pipelines.tasks import get_task

from conftest import tiny_unimodal
from test_loader import TASKS, cfg, take


def _eos_per_sample(batch, eos: int) -> list[int]:
    """How many answers (``<eos>``) each packed sample of a batch holds."""
    out = []
    for r in range(batch.ids.shape[0]):
        sid = batch.sample_ids[r]
        for s in sid.unique().tolist():
            if s >= 0:
                out.append(int(((batch.ids[r] == eos) & (sid == s)).sum()))
    return out


def test_a_share_of_training_samples_carries_demonstrations(shard_dir, toks):
    from unimodal.data_pipelines.tasks import special
    eos = special("<eos>").ids[0]
    alone = take(StreamDataset(cfg(shard_dir, shot_share=0.0, seq_len=256), toks, TASKS[:4], 0, 1))
    shots = take(StreamDataset(cfg(shard_dir, shot_share=1.0, seq_len=256), toks, TASKS[:4], 0, 1))
    per_alone = [n for b in alone for n in _eos_per_sample(b, eos)]
    per_shots = [n for b in shots for n in _eos_per_sample(b, eos)]
    assert max(per_alone) == 1  # every sample alone: one answer
    assert max(per_shots) >= 3 and np.mean(per_shots) > 1.5  # 1..3 demonstrations fit mostly
    assert shots[-1].stats["with_shots"] > 0 and "with_shots" not in alone[-1].stats


def test_validation_never_gets_demonstrations(shard_dir, toks):
    val = StreamDataset(cfg(shard_dir, shot_share=1.0), toks, TASKS, 0, 1, split="val", split_by="samples")
    assert not any(val.shots_ok)
    train = StreamDataset(cfg(shard_dir, shot_share=1.0), toks, TASKS, 0, 1)
    assert train.shots_ok == [True] * 5  # control too: demonstration episodes before its window


def test_training_context_is_the_prompt_few_shot_prompting_builds(shard_dir, toks, tmp_path):
    """The k-shot training form of a sample, cut before its answer, is exactly the prompt
    Unimodal.prompt builds from the same demonstrations."""
    um = tiny_unimodal(toks, tmp_path / "m.ckpt", TASKS, seq_len=256)
    ds = StreamDataset(cfg(shard_dir, shot_share=1.0, seq_len=256, shot_select="random"), toks, TASKS, 0, 1)
    task = get_task("text.translate.en-fr")
    reads = (r for r, _ in ds.samples(ds.urls, np.random.default_rng(0), Counter()))
    raws = list(islice((r for r in reads if b"en-fr" in (r.get("json") or b"")), 4))
    query = decode_sample(dict(raws[0]))
    demos = [decode_sample(dict(r)) for r in raws[1:4]]
    spans = task.to_spans(query, toks)
    rng = np.random.default_rng(3)
    trained = ds._with_shots(spans, TASKS.index("text.translate.en-fr"), [dict(r) for r in raws[1:2]], rng,
                             Counter(), Neighbours(1), 0)
    # every demonstration's answer is a target too, as in its own training form
    k, rest = divmod(sum(s.is_target for s in trained), sum(s.is_target for s in spans))
    assert rest == 0 and 2 <= k <= 4  # the query and 1..3 demonstrations (one reservoir item here)
    prompt, _ = um.prompt("text.translate.en-fr", query, shots=demos[:1] * (k - 1))
    n_answer = len(task.answer_spans(task.answer(query), toks))
    assert [s.ids.tolist() for s in trained[:-n_answer]] == [s.ids.tolist() for s in prompt]


def test_shot_settings_are_checked():
    with pytest.raises(ValueError, match="shot_share"):
        DataConfig(shot_share=1.5)
    with pytest.raises(ValueError, match="max_shots"):
        DataConfig(max_shots=0)


# --------------------------------------------------------------------------------------
# control: demonstrations are the last timesteps of other expert episodes (Gato)
# --------------------------------------------------------------------------------------
CART = "control.cartpole-v1"


def episode(key: str, T: int, policy: str | None, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    meta = {"task": CART, "env": "CartPole-v1", "return": float(T), **({"policy": policy} if policy else {})}
    return {"__key__": key, "obs.npy": rng.normal(size=(T, 4)).astype(np.float32),
            "act.npy": rng.integers(0, 2, T).astype(np.int64), "json": meta}


@pytest.fixture
def ctl_shards(tmp_path, toks):
    """CartPole episodes: 16 in train (every other one an expert's, the rest 'dart'), 4 in
    val and test, a manifest with the environment's baselines, the tokenizers' models."""
    import json

    import webdataset as wds

    from unimodal.data_pipelines.shards import encode_sample

    splits = {}
    for split, n in (("train", 16), ("val", 4), ("test", 4)):
        (tmp_path / split).mkdir()
        eps = [episode(f"{split}{i}", 8 + 7 * i, "expert" if i % 2 == 0 else "dart", i) for i in range(n)]
        with wds.TarWriter(str(tmp_path / split / f"{split}-000000.tar")) as w:
            for s in eps:
                w.write(encode_sample(s))
        splits[split] = {"shards": [f"{split}/{split}-000000.tar"], "samples": {CART: n}, "total": n}
    manifest = {"splits": splits, "control": {"CartPole-v1": {"expert_return": 500.0, "random_return": 20.0}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "text.model").write_bytes(toks.text.model_proto)
    (tmp_path / "code.model").write_bytes(toks.code.model_proto)
    return tmp_path


def _raw_episodes(ds) -> dict[str, dict]:
    """The train split's raw samples of a StreamDataset, by key."""
    out = {}
    for raw, _ in ds.samples(ds.urls, np.random.default_rng(0), Counter()):
        if raw["__key__"] in out:
            return out
        out[raw["__key__"]] = raw


def test_control_training_demonstrations_are_the_prefix_the_roll_out_builds(ctl_shards, toks, tmp_path):
    """A control sample trained behind demonstrations starts with exactly the ids the
    roll-out's context starts with for the same demonstration episodes; each demonstration
    is its episode's last timesteps with its actions as targets, and the live window keeps
    at least half the row."""
    from unimodal.data_pipelines.packing import flatten, sample_length
    from unimodal.data_pipelines.tasks import special
    from unimodal.rollout import ControlRunner

    um = tiny_unimodal(toks, tmp_path / "m.ckpt", [CART], seq_len=128)
    ds = StreamDataset(cfg(ctl_shards, shot_share=1.0, seq_len=128), toks, [CART], 0, 1)
    raws = _raw_episodes(ds)
    query, demo = raws["train1"], raws["train14"]  # a dart episode as the query, an expert's 113 steps
    eos = special("<eos>").ids[0]
    for seed in range(4):  # 1..3 demonstrations, all of the one expert episode in the reservoir
        trained = ds._control_with_shots(decode_sample(dict(query)), query, 0, [query, demo, raws["train3"]],
                                         np.random.default_rng(seed), Counter())
        flat = flatten(trained)
        k = int((flat["ids"] == eos).sum())
        assert 1 <= k <= 3 and sample_length(trained) <= 128
        runner = ControlRunner(um, CART, n=1, context=128, demos=[decode_sample(dict(demo))] * k)
        P = int(runner.prefix_len[0])
        assert flat["ids"][:P].tolist() == runner.prefix_ids[0].tolist()
        assert flat["modality"][:P].tolist() == runner.prefix_mod[0].tolist()
        assert P - runner.n_plain <= 64  # the demonstrations take at most half the row
        # the demonstration is the episode's last timesteps: its actions end with the episode's
        act = np.asarray(decode_sample(dict(demo))["act.npy"])
        start = toks.vocab.range("action")[0]
        demo_acts = [s.ids[0] - start for s in trained[: next(j for j, s in enumerate(trained) if s.ids[0] == eos)]
                     if s.modality == "action"]
        assert demo_acts == act[len(act) - len(demo_acts):].tolist() and len(demo_acts) < len(act)
        # one loss rule: demonstration actions are targets, as in an episode's own training form
        assert all(s.is_target for s in trained if s.modality == "action")
        assert not any(s.is_target for s in trained if s.modality != "action")


def test_only_other_expert_episodes_are_control_demonstrations(ctl_shards, toks):
    from unimodal.data_pipelines.packing import flatten
    from unimodal.data_pipelines.tasks import special
    ds = StreamDataset(cfg(ctl_shards, shot_share=1.0, seq_len=128), toks, [CART], 0, 1)
    raws = _raw_episodes(ds)
    eos = special("<eos>").ids[0]
    stats = Counter()
    # the reservoir holds the query itself (an expert's) and dart episodes only: the window alone
    alone = ds._control_with_shots(decode_sample(dict(raws["train2"])), raws["train2"], 0,
                                   [raws["train2"], raws["train1"], raws["train3"]], np.random.default_rng(0), stats)
    assert not any(eos in s.ids for s in alone) and stats["with_shots"] == 0
    plain = get_task(CART).to_spans(decode_sample(dict(raws["train2"])), toks, np.random.default_rng(0), max_len=128)
    assert flatten(alone)["ids"].tolist() == flatten(plain)["ids"].tolist()  # the window of a row alone
    # the whole stream: with shot_share 1 most control samples carry demonstrations
    batches = take(StreamDataset(cfg(ctl_shards, shot_share=1.0, seq_len=128, shuffle_buffer=16), toks, [CART], 0, 1))
    assert batches[-1].stats["with_shots"] > 0.5 * batches[-1].stats["used"]
    assert max(n for b in batches for n in _eos_per_sample(b, eos)) >= 2


def test_a_re_prefill_keeps_the_demonstrations_at_the_front(toks, tmp_path):
    """Driven past its context, the runner re-prefills the live episode's window only: the
    demonstrations stay the first ids of every row with their cached keys untouched, the
    live episode keeps as many timesteps as a runner without demonstrations keeps, and the
    logits of every action are those of a fresh, uncached forward over the row's context
    (rows with prefixes of different lengths included)."""
    import torch

    from unimodal.rollout import ControlRunner

    um = tiny_unimodal(toks, tmp_path / "m.ckpt", [CART], seq_len=96)
    demos = [[episode("a", 40, "expert", 1)], [episode("b", 2, "expert", 2)]]  # 5 and 2 timesteps kept
    runner = ControlRunner(um, CART, n=2, context=96, refill=0.5, demos=demos)
    plain = ControlRunner(um, CART, n=2, context=96, refill=0.5)
    P = runner.prefix_ids.shape[1]
    assert runner.prefix_len.tolist()[0] == P > runner.prefix_len.tolist()[1] > plain.prefix_ids.shape[1]
    feed, logits = runner._feed, []
    runner._feed = lambda: logits.append(feed()) or logits[-1]
    lives, plain_lives = [], []  # timesteps each re-prefill keeps of the live episode

    def counting(r, into):
        window = r._window
        r._window = lambda budget, cur: (window(budget, cur), into.append(len(r.steps)) if budget < 96 else None)
    counting(runner, lives)
    counting(plain, plain_lives)
    rng = np.random.default_rng(0)
    spec, kept = runner.spec, None
    for t in range(30):
        obs = rng.normal(size=(2, 4)).astype(np.float32)
        runner(obs[:runner.n])
        plain(obs)
        if t == 0:
            kept = runner.cache.k[:, :, :, :P].clone()
        assert (runner.seq_ids[:, :P] == runner.prefix_ids).all() and runner.cache.length >= P
        assert torch.equal(runner.cache.k[:, :, :, :P], kept)
        for r in range(runner.n):  # the reference: one row, no cache, no padding
            own = int(runner.prefix_len[r])
            ids = np.concatenate([runner.prefix_ids[r, :own], runner.seq_ids[r, P:-1]])
            mod = np.concatenate([runner.prefix_mod[r, :own], runner.seq_mod[r, P:-1]])
            x = torch.from_numpy(ids)[None]
            with torch.inference_mode():
                want = um.model(ids=x, modality=torch.from_numpy(mod)[None],
                                positions=torch.arange(len(ids))[None], sample_ids=torch.zeros_like(x))[0, -1]
            torch.testing.assert_close(logits[-1][r], want, atol=1e-4, rtol=1e-4)
            assert int(spec.pick(want[None], runner.allowed, 0.0, None, None)[0]) == runner.seq_ids[r, -1]
        if t == 20:
            runner.select([1])  # the episode with the longer prefix ended
            kept = kept[:, [1]]
    assert lives and set(lives) == set(plain_lives) == {(48 - plain.prefix_ids.shape[1] - 6) // 6}


def test_evaluate_scores_control_behind_0_1_and_3_demonstrations(ctl_shards, toks, tmp_path, monkeypatch):
    """`evaluate(..., shots=(0, 1, 3))` rolls the same episodes out behind k expert train
    episodes (1 shot's the first of 3 shots'), with n and intervals per k; 0 shots is the
    plain roll-out, which shots=() and shots=(0,) leave as it is."""
    from unimodal import evaluate as ev
    from unimodal.evaluate import evaluate, markdown_table

    um = tiny_unimodal(toks, tmp_path / "m.ckpt", [CART], seq_len=256)
    seen = []
    real = ev.ControlRunner

    def spy(*a, demos=(), **kw):
        seen.append([[d["__key__"] for d in row] for row in demos])
        return real(*a, demos=demos, **kw)

    monkeypatch.setattr(ev, "ControlRunner", spy)
    res = evaluate(um, str(ctl_shards), tasks=[CART], episodes=3, shots=(0, 1, 3))
    m = res["tasks"][CART]
    assert set(m["shots"]) == {"0", "1", "3"}
    for k, cell in m["shots"].items():
        assert cell["n"]["normalized_return"] == 3 and len(cell["ci95"]["normalized_return"]) == 2
        lo, hi = cell["ci95"]["normalized_return"]
        assert lo <= np.mean(cell["per_item"]["normalized_return"]) <= hi and cell["items"] == [0, 1, 2]
        assert cell["demonstrations"] == int(k)  # all of them fit in 256 positions
    assert m["shots"]["0"]["per_item"] == m["per_item"]
    plain, one, three = seen
    assert plain == [] and [len(r) for r in one] == [1] * 3 and [len(r) for r in three] == [3] * 3
    experts = {f"train{i}" for i in range(0, 16, 2)}
    for o, t in zip(one, three):
        assert o[0] == t[0] and len(set(t)) == 3 and set(t) <= experts  # nested, distinct, experts of train
    assert "| control.cartpole-v1 | 3 shots | 3 |" in markdown_table(res)
    none = evaluate(um, str(ctl_shards), tasks=[CART], episodes=3, shots=())
    zero = evaluate(um, str(ctl_shards), tasks=[CART], episodes=3, shots=(0,))
    assert none["tasks"][CART]["per_item"] == zero["tasks"][CART]["per_item"] == m["per_item"]
    assert "shots" not in zero["tasks"][CART]


# --------------------------------------------------------------------------------------
# demonstrations chosen near the query (shot_select="nearest")
# --------------------------------------------------------------------------------------
EN_FR = "text.translate.en-fr"


def pair(src: str, tgt: str, group: str) -> dict:
    return {"json": {"task": EN_FR, "src": src, "tgt": tgt, "group": group}}


NUMBERS = [pair("three hundred and twenty-one", "trois cent vingt et un", "num-321"),
           pair("five thousand", "cinq mille", "num-5000"),
           pair("three hundred and twenty two", "trois cent vingt-deux", "num-322"),  # the query's group
           pair("two hundred and twenty-two", "deux cent vingt-deux", "num-222"),
           pair("eight", "huit", "num-8"),
           pair("three hundred and twenty-three", "trois cent vingt-trois", "num-323")]
QUERY = pair("three hundred and twenty-two", "trois cent vingt-deux", "num-322")


def _cosine(toks, a: str, b: str) -> float:
    """The closeness the key approximates, computed exactly (no hashing): the cosine of two
    sources' counts of token unigrams and bigrams."""
    def grams(text):
        ids = toks.text.encode(text).ids.tolist()
        return Counter(ids) + Counter(zip(ids, ids[1:]))
    ga, gb = grams(a), grams(b)
    dot = sum(v * gb[k] for k, v in ga.items())
    return dot / np.sqrt(sum(v * v for v in ga.values()) * sum(v * v for v in gb.values()))


def test_the_input_key_ranks_inputs_as_their_shared_tokens_do(toks):
    from unimodal.data_pipelines.tasks import input_key, rank_nearest

    task = get_task(EN_FR)
    keys = [input_key(task.to_spans(s, toks)) for s in NUMBERS]
    q = input_key(task.prompt_spans(QUERY, toks))
    assert all(abs(np.linalg.norm(k) - 1) < 1e-5 for k in keys)
    order = rank_nearest(q, keys, len(keys))
    closeness = [_cosine(toks, QUERY["json"]["src"], NUMBERS[i]["json"]["src"]) for i in order]
    assert closeness == sorted(closeness, reverse=True)  # nearest first, as the exact cosine says
    assert order[-2:] in ([1, 4], [4, 1])  # "five thousand" and "eight" share nothing
    # a key of another length (other inputs) is never a neighbour
    assert rank_nearest(q, [np.ones(3, np.float32), None], 2) == []


def test_an_image_key_finds_the_image_it_was_cut_from(toks):
    """Continuous inputs: a noisy copy of an image is nearer to it than any other image."""
    from unimodal.data_pipelines.tasks import input_key, rank_nearest

    from conftest import png_bytes
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 255, (8, 8)) for _ in range(6)]
    task = get_task("image.classify")

    def key(p):
        return input_key(task.prompt_spans({"png": png_bytes(p), "json": {"label": "x"}}, toks))

    keys = [key(p) for p in pixels]
    for i, p in enumerate(pixels):
        noisy = np.clip(p + rng.integers(-20, 21, p.shape), 0, 255)
        assert rank_nearest(key(noisy), keys, 1) == [i]


def test_the_pool_gives_the_nearest_demonstrations_last_never_the_querys_source(toks):
    from unimodal.data_pipelines.tasks import DemoPool

    pool = DemoPool(get_task(EN_FR), NUMBERS, toks)
    three = [d["json"]["group"] for d in pool.choose(QUERY, 3)]
    one = [d["json"]["group"] for d in pool.choose(QUERY, 1)]
    assert "num-322" not in three  # the query's own number (another spelling) is never shown
    assert three[-1] in ("num-321", "num-323") and one == three[-1:]  # the nearest next to the query
    assert {"num-5000", "num-8"}.isdisjoint(three)
    # an answer the query shares is excluded too, whatever the group says
    twin = pair("three hundred twenty-two", "trois cent vingt-deux", "other")
    assert twin not in DemoPool(get_task(EN_FR), NUMBERS + [twin], toks).choose(QUERY, 5)
    # a random draw: the same for one item at every k, 1 shot's among 3 shots'
    rnd = DemoPool(get_task(EN_FR), NUMBERS, toks, "random")
    assert rnd.choose(QUERY, 1, seed=0, index=7) == rnd.choose(QUERY, 3, seed=0, index=7)[-1:]
    with pytest.raises(ValueError, match="shot select"):
        DemoPool(get_task(EN_FR), NUMBERS, toks, "closest")


def test_neighbours_follow_the_reservoir_slot_by_slot():
    def unit(*v):
        v = np.asarray(v, np.float32)
        return v / np.linalg.norm(v)

    near = Neighbours(4)
    near.remember(0, unit(1, 0), ("g0", None))
    near.remember(1, unit(1, 0.1), ("g1", None))
    near.remember(2, unit(0, 1), ("g2", None))
    near.remember(3, unit(1, 0.05), ("g0", None))  # the query's group: never its neighbour
    assert near.nearest(0, 3) == [1, 2]
    assert near.nearest(1, 1) == [3]
    near.forget(1)  # a new read took slot 1: not a candidate until it is drawn and keyed
    assert near.nearest(0, 3) == [2]
    near.remove(2)  # the reservoir popped slot 2: slot 3 moves to 2
    assert near.nearest(2, 3) == [] and near.ok.tolist() == [True, False, True, False]
    assert near.nearest(0, 3) == [] and near.sources[2].tolist() == ["g0", None]


def test_training_rows_put_the_nearest_drawn_samples_before_the_query(toks, tmp_path):
    """With shot_select='nearest' the demonstrations of a training row are the reservoir's
    nearest keyed samples, the nearest last, as DemoPool chooses them at evaluation."""
    from conftest import write_shards
    from unimodal.data_pipelines.tasks import DemoPool, special

    write_shards(tmp_path, [{"__key__": f"n{i}", **s} for i, s in enumerate(NUMBERS + [QUERY])], per_shard=10)
    ds = StreamDataset(cfg(tmp_path, shot_share=1.0, seq_len=256, max_shots=3, shot_select="nearest"),
                       toks, [EN_FR], 0, 1)
    raws = _raw_translations(ds)
    reservoir = [dict(r) for r in raws]
    near = Neighbours(len(reservoir))
    task = get_task(EN_FR)
    from unimodal.data_pipelines.tasks import demo_source, input_key
    for j, r in enumerate(reservoir):
        s = decode_sample(r)
        near.remember(j, input_key(task.to_spans(s, toks)), demo_source(task, s))
    q = next(j for j, r in enumerate(reservoir) if decode_sample(r)["json"] == QUERY["json"])
    spans = task.to_spans(decode_sample(reservoir[q]), toks)
    sep = special("<eos>").ids[0]
    for seed in range(6):
        rng = np.random.default_rng(seed)
        n = int(np.random.default_rng(seed).integers(1, 4))  # the row's number of demonstrations
        row = ds._with_shots(spans, 0, reservoir, rng, Counter(), near, q)
        expected = DemoPool(task, [decode_sample(r) for r in reservoir], toks).choose(decode_sample(reservoir[q]), n)
        demos = [task.to_spans(d, toks)[1:] for d in expected]
        assert [s.ids.tolist() for s in row if s.ids is not None] == \
            [s.ids.tolist() for s in [spans[0], *[x for d in demos for x in d], *spans[1:]] if s.ids is not None]
        assert sum(int((s.ids == sep).sum()) for s in row if s.modality == "special") == n + 1


def _raw_translations(ds) -> list[dict]:
    out = {}
    for raw, _ in ds.samples(ds.urls, np.random.default_rng(0), Counter()):
        if raw["__key__"] in out:
            return list(out.values())
        out[raw["__key__"]] = raw


def test_shot_select_is_checked():
    with pytest.raises(ValueError, match="shot_select"):
        DataConfig(shot_select="closest")


def test_prompt_shots_puts_the_nearest_train_samples_before_the_query(toks, tmp_path, monkeypatch, capsys):
    """`unimodal prompt --shots 2`: the two train samples nearest the typed source, the
    nearest last; --shot-select random draws others."""
    import json

    from conftest import write_shards
    from unimodal.cli import main
    from unimodal.generate import Unimodal

    write_shards(tmp_path, [{"__key__": f"n{i}", **s} for i, s in enumerate(NUMBERS)], per_shard=10)
    tiny_unimodal(toks, tmp_path / "m.ckpt", [EN_FR], seq_len=256)
    (tmp_path / "text.model").write_bytes(toks.text.model_proto)
    (tmp_path / "code.model").write_bytes(toks.code.model_proto)
    seen = []
    real = Unimodal.answer
    monkeypatch.setattr(Unimodal, "answer", lambda self, task, sample, shots=(), **kw: (
        seen.append([d["json"]["src"] for d in shots]), real(self, task, sample, shots, **kw))[1])
    argv = ["prompt", "--ckpt", str(tmp_path / "m.ckpt"), "--task", EN_FR, "--text", QUERY["json"]["src"],
            "--shards", str(tmp_path), "--shots", "2", "--max-new-tokens", "2", "--json"]
    assert main(argv + ["--shot-select", "nearest"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shots"] == 2
    by_cosine = sorted((n["json"]["src"] for n in NUMBERS), key=lambda src: -_cosine(toks, QUERY["json"]["src"], src))
    assert seen[-1] == by_cosine[:2][::-1]  # a typed query has no group: any train sample may show
    # the default is how the checkpoint was trained: this one says nothing, so a random draw
    assert main(argv + ["--seed", "1"]) == 0 and main(argv + ["--shot-select", "random", "--seed", "1"]) == 0
    assert seen[-1] == seen[-2] and len(seen[-1]) == 2
    assert main(argv[:-5] + ["--shots", "9"]) == 2  # more than the train split holds: one line, exit 2
    assert "has only 6 train samples" in capsys.readouterr().err


def test_shots_are_chosen_as_the_checkpoint_was_trained(toks, tmp_path):
    from unimodal.generate import Unimodal

    um = tiny_unimodal(toks, tmp_path / "m.ckpt", [EN_FR], seq_len=64)
    assert um.shot_select == "random"  # a checkpoint without data.shot_select
    for select in ("nearest", "random"):
        um2 = Unimodal(um.model, um.toks, [EN_FR], {"data": {"shot_select": select}})
        assert um2.shot_select == select

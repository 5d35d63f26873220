"""data_pipelines/convert.py: `unimodal data convert FORMAT SRC --out DIR` on small real
fixtures of each format (made here), bad rows, resuming, workers, --tokenizers-from, and
(slow) training on a converted folder."""
from __future__ import annotations

import io
import json
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from unimodal.data_pipelines import convert as cv
from unimodal.data_pipelines.__main__ import main
from unimodal.data_pipelines.convert import BadRow, DataBuildError, convert
from unimodal.data_pipelines.converters import audio as audio_fmt
from unimodal.data_pipelines.converters import text as text_fmt
from unimodal.data_pipelines.shards import split_of

# shares that leave a few groups in val and test even for these small fixtures
FRACTIONS = (0.6, 0.2)


def read_all(out: Path, manifest: dict) -> dict[str, list[dict]]:
    """split -> samples (json decoded, members as bytes) of a converted folder."""
    got = {}
    for split, v in manifest["splits"].items():
        urls = [str(out / s) for s in v["shards"]]
        samples = list(wds.WebDataset(urls, shardshuffle=False)) if urls else []
        for s in samples:
            s["json"] = json.loads(s["json"])
        got[split] = samples
        counts = defaultdict(int)
        for s in samples:
            counts[s["json"]["task"]] += 1
        assert dict(counts) == v["samples"] and len(samples) == v["total"]  # the manifest's counts hold
    return got


def flat(got: dict) -> list[dict]:
    return [s for v in got.values() for s in v]


def assert_groups_in_one_split(got: dict, fractions=FRACTIONS) -> None:
    where = defaultdict(set)
    for split, samples in got.items():
        for s in samples:
            where[s["json"]["group"]].add(split)
            assert split_of(s["json"]["group"], fractions) == split
    assert where and all(len(v) == 1 for v in where.values())


def comparable(got: dict) -> dict:
    """Everything a sample holds, per split, for comparing two conversions."""
    def one(s):
        members = tuple(sorted((k, v) for k, v in s.items() if not k.startswith("__") and k != "json"))
        return s["__key__"], json.dumps(s["json"], sort_keys=True), members
    return {split: sorted(one(s) for s in v) for split, v in got.items()}


def png(rng, size=(12, 12), mode="RGB") -> bytes:
    shape = size + ((3,) if mode == "RGB" else ())
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape).astype(np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture
def imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    for c in ("cat", "dog", "golden_retriever"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            (root / c / f"{i:02d}.png").write_bytes(png(rng))
    dup = png(rng)  # one picture filed under two classes: one group, one split
    (root / "cat" / "dup.png").write_bytes(dup)
    (root / "dog" / "dup.png").write_bytes(dup)
    Image.fromarray(rng.integers(0, 255, (9, 9, 3)).astype(np.uint8)).save(root / "dog" / "x.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, (9, 9)).astype(np.uint8), mode="L").save(root / "dog" / "y.bmp")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "cat" / "notes.txt").write_text("not an image, not a row")
    return root


def test_imagefolder(imagefolder, tmp_path):
    m = convert("imagefolder", imagefolder, tmp_path / "out", fractions=FRACTIONS, progress=False)
    got = read_all(tmp_path / "out", m)
    samples = flat(got)
    assert len(samples) == 12 * 3 + 2 + 2 == sum(v["total"] for v in m["splits"].values())
    assert m["tasks"] == ["image.classify"] and m["recipe"] == "convert:imagefolder"
    labels = {s["json"]["file"]: s["json"]["label"] for s in samples}
    assert labels["golden_retriever/03.png"] == "golden_retriever" and labels["dog/x.jpg"] == "dog"
    by_file = {s["json"]["file"]: s for s in samples}
    assert "jpg" in by_file["dog/x.jpg"] and by_file["dog/x.jpg"]["jpg"] == (imagefolder / "dog/x.jpg").read_bytes()
    assert Image.open(io.BytesIO(by_file["dog/y.bmp"]["png"])).format == "PNG"  # re-encoded
    assert by_file["cat/00.png"]["png"] == (imagefolder / "cat/00.png").read_bytes()  # as read
    assert by_file["cat/dup.png"]["json"]["group"] == by_file["dog/dup.png"]["json"]["group"]
    assert_groups_in_one_split(got)
    assert m["skipped"]["reasons"] == {"bad_image": 1}
    assert "cat/broken.png" in m["skipped"]["examples"][0]
    assert (tmp_path / "out" / "text.model").is_file() and (tmp_path / "out" / "code.model").is_file()
    from unimodal.training import load_tokenizers
    assert load_tokenizers(str(tmp_path / "out"), m).hash == m["tokenizers_hash"]
    assert not list(tmp_path.glob(".out*"))  # completed atomically: no partial folder left
    # options: spaces in labels, the image tokenizer's settings in the manifest
    m2 = convert("imagefolder", imagefolder, tmp_path / "out2", progress=False,
                 options={"underscores_as_spaces": True, "image_size": 8, "channels": 3})
    assert "golden retriever" in {s["json"]["label"] for s in flat(read_all(tmp_path / "out2", m2))}
    assert m2["tokenizer_settings"]["image"]["resolution"] == [8, 8]
    assert m2["tokenizer_settings"]["image"]["channels"] == 3


def test_img2dataset_tar_and_loose_files(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "laion"
    (src / "00000").mkdir(parents=True)
    captions = {}
    with wds.TarWriter(str(src / "00000.tar")) as w:
        for i in range(10):
            key = f"0000{i:04d}"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (10, 10, 3)).astype(np.uint8)).save(buf, format="JPEG")
            sample = {"__key__": key, "jpg": buf.getvalue(),
                      "json": json.dumps({"url": f"http://x/{i}", "key": key, "caption": f"json {i}"}).encode()}
            if i != 3:  # sample 3 has its caption in the .json only
                sample["txt"] = ("" if i == 5 else f"a photo  of thing {i}\n").encode()
            captions[f"00000.tar:{key}"] = {3: "json 3", 5: None}.get(i, f"a photo of thing {i}")
            w.write(sample)
    for i in range(4):  # img2dataset's folder output
        (src / "00000" / f"1000{i}.png").write_bytes(png(rng))
        (src / "00000" / f"1000{i}.txt").write_text(f"loose {i}")
        captions[f"00000/1000{i}"] = f"loose {i}"
    (src / "00000" / "20000.txt").write_text("a caption whose image is gone")
    (src / "00000" / "30000.json").write_text('{"status": "failed_to_download"}')  # not a row
    (src / "00000_stats.json").write_text("{}")
    m = convert("img2dataset", src, tmp_path / "out", fractions=FRACTIONS, progress=False)
    got = read_all(tmp_path / "out", m)
    seen = {s["json"]["ref"]: s["json"]["caption"] for s in flat(got)}
    assert seen == {k: v for k, v in captions.items() if v is not None}
    assert m["tasks"] == ["image.caption"]
    assert m["skipped"]["reasons"] == {"empty_caption": 1, "missing_image": 1}
    assert any("00000.tar:00000005" in e for e in m["skipped"]["examples"])
    assert any("00000/20000" in e for e in m["skipped"]["examples"])
    urls = {s["json"].get("url") for s in flat(got)}
    assert "http://x/0" in urls
    assert_groups_in_one_split(got)


@pytest.fixture
def audio_src(tmp_path):
    """Clips at 8 kHz stereo (WAV) and 22.05 kHz mono (FLAC), a CSV and a JSONL manifest."""
    d = tmp_path / "speech"
    (d / "clips").mkdir(parents=True)
    rows = []
    for i in range(12):
        if i % 2:
            name, rate, ch, fmt = f"clips/c{i}.wav", 8000, 2, "WAV"
        else:
            name, rate, ch, fmt = f"clips/c{i}.flac", 22050, 1, "FLAC"
        sf.write(d / name, tone(0.3 + 0.05 * i, rate, ch, 300 + 20 * i), rate, format=fmt)
        rows.append((name, f"clip number {i}", f"spk{i % 4}"))
    (d / "clips" / "noise.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    rows.append(("clips/noise.wav", "undecodable", "spk9"))
    rows.append(("clips/missing.flac", "no such file", "spk9"))
    sf.write(d / "clips" / "long.flac", tone(5.0, 8000), 8000, format="FLAC")
    rows.append(("clips/long.flac", "too long for 4 s", "spk9"))
    rows.append(("clips/c0.flac", "   ", "spk9"))  # an empty transcript
    with open(d / "train.csv", "w") as f:
        f.write("path,text,speaker\n")
        for r in rows:
            f.write(",".join(f'"{x}"' if "," in x else x for x in r) + "\n")
        f.write("clips/c1.wav,too,many,fields\n")
    with open(d / "train.jsonl", "w") as f:
        for p, t, s in rows[:12]:
            f.write(json.dumps({"audio": p, "transcript": t, "client_id": s}) + "\n")
        f.write("{not json\n")
    return d


def test_audio_manifest_csv_and_jsonl(audio_src, tmp_path):
    m = convert("audio-manifest", audio_src / "train.csv", tmp_path / "csv", fractions=FRACTIONS, progress=False)
    got = read_all(tmp_path / "csv", m)
    samples = flat(got)
    assert len(samples) == 12 and m["tasks"] == ["audio.transcribe"]
    assert m["skipped"]["reasons"] == {"bad_audio": 1, "missing_file": 1, "audio_too_long": 1,
                                       "empty_text": 1, "malformed_line": 1}
    ex = "\n".join(m["skipped"]["examples"])
    assert "train.csv:14" in ex and "train.csv:18" in ex and "4 s" in ex  # file:line of the bad rows
    for s in samples:
        name = s["json"]["file"]
        i = int(s["json"]["transcript"].rsplit(" ", 1)[1])
        member = "wav" if i % 2 else "flac"
        assert s[member] == (audio_src / f"clips/c{i}.{member}").read_bytes()  # the bytes as read
        info = sf.info(io.BytesIO(s[member]))
        assert (info.samplerate, info.channels) == ((8000, 2) if i % 2 else (22050, 1)), name
        assert s["json"]["speaker"] == f"spk{i % 4}" and s["json"]["group"] == f"speaker-spk{i % 4}"
    assert_groups_in_one_split(got)
    assert m["tokenizer_settings"]["audio"]["max_seconds"] == 4.0
    # the JSONL manifest, its other column names, and a longer max_seconds
    m = convert("audio-manifest", audio_src / "train.jsonl", tmp_path / "jsonl", fractions=FRACTIONS,
                progress=False, options={"max_seconds": 6.0})
    assert sum(v["total"] for v in m["splits"].values()) == 12
    assert m["skipped"]["reasons"] == {"malformed_line": 1}
    assert m["tokenizer_settings"]["audio"]["max_seconds"] == 6.0
    # the audio tokenizer reads every clip: any rate and channel count
    from unimodal.tokenizers.audio import AudioTokenizer
    tok = AudioTokenizer(**m["tokenizer_settings"]["audio"])
    for s in flat(read_all(tmp_path / "jsonl", m)):
        assert len(tok.encode(s.get("flac") or s["wav"], cut=False)) > 0


def test_librispeech(tmp_path):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    expected = {}
    for spk in ("84", "174", "251", "422", "652", "777"):
        for chap in ("1000", "2000"):
            d = root / spk / chap
            d.mkdir(parents=True)
            lines = []
            for u in range(3):
                uid = f"{spk}-{chap}-{u:04d}"
                sf.write(d / f"{uid}.flac", tone(0.2, 16000), 16000, format="FLAC")
                lines.append(f"{uid} HELLO WORLD NUMBER {u}")
                expected[uid] = f"hello world number {u}"
            if spk == "84" and chap == "1000":
                lines.append("84-1000-0009 A LINE WHOSE AUDIO IS MISSING")
            (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    m = convert("librispeech", tmp_path / "LibriSpeech", tmp_path / "out", fractions=(0.5, 0.25), progress=False)
    got = read_all(tmp_path / "out", m)
    assert {s["json"]["id"]: s["json"]["transcript"] for s in flat(got)} == expected
    assert m["skipped"]["reasons"] == {"missing_file": 1}
    assert "dev-clean/84/1000/84-1000.trans.txt:4" in m["skipped"]["examples"][0]
    speakers = defaultdict(set)
    for split, samples in got.items():
        for s in samples:
            speakers[s["json"]["speaker"]].add(split)
    assert all(len(v) == 1 for v in speakers.values())  # test speakers are unseen in training
    assert len({next(iter(v)) for v in speakers.values()}) >= 2
    assert m["tokenizer_settings"]["audio"]["max_seconds"] == audio_fmt.LIBRISPEECH_MAX_SECONDS


@pytest.fixture
def parallel_src(tmp_path):
    d = tmp_path / "par"
    d.mkdir()
    en = [f"sentence {i % 20}" for i in range(30)]  # each sentence twice or so
    fr = [f"phrase {i % 20} v{i}" for i in range(30)]
    lines = [f"{a}\t{b}" for a, b in zip(en, fr)]
    lines.insert(7, "a line without a tab")
    lines.insert(9, "too\tmany\ttabs")
    lines.insert(11, "  \tempty source")
    (d / "pairs.tsv").write_text("\n".join(lines) + "\n")
    (d / "pairs.jsonl").write_text("".join(json.dumps({"en": a, "fr": b}) + "\n" for a, b in zip(en, fr)))
    (d / "corpus.en").write_text("\n".join(en) + "\n")
    (d / "corpus.fr").write_text("\n".join(fr) + "\n")
    return d, list(zip(en, fr))


def test_parallel_tsv_jsonl_and_moses(parallel_src, tmp_path):
    d, pairs = parallel_src
    m = convert("parallel", d / "pairs.tsv", tmp_path / "tsv", fractions=FRACTIONS, progress=False,
                options={"src_lang": "en", "tgt_lang": "fr"})
    got = read_all(tmp_path / "tsv", m)
    assert sorted((s["json"]["src"], s["json"]["tgt"]) for s in flat(got)) == sorted(pairs)
    assert m["tasks"] == ["text.translate.en-fr"]
    assert m["skipped"]["reasons"] == {"malformed_line": 2, "empty_side": 1}
    ex = "\n".join(m["skipped"]["examples"])
    assert "pairs.tsv:8" in ex and "pairs.tsv:10" in ex and "pairs.tsv:12" in ex
    assert_groups_in_one_split(got)
    by_src = defaultdict(set)
    for split, samples in got.items():
        for s in samples:
            by_src[s["json"]["src"]].add(split)
    assert all(len(v) == 1 for v in by_src.values())  # a repeated sentence never straddles splits
    # JSONL with the languages as keys, both directions
    m = convert("parallel", d / "pairs.jsonl", tmp_path / "jsonl", fractions=FRACTIONS, progress=False,
                options={"both_directions": True})
    got = read_all(tmp_path / "jsonl", m)
    assert m["tasks"] == ["text.translate.en-fr", "text.translate.fr-en"]
    for split in got:
        fwd = {(s["json"]["src"], s["json"]["tgt"]) for s in got[split] if s["json"]["task"].endswith("en-fr")}
        rev = {(s["json"]["tgt"], s["json"]["src"]) for s in got[split] if s["json"]["task"].endswith("fr-en")}
        assert fwd == rev  # the reverse of a pair is in its split
    # a Moses pair by prefix, languages from the suffixes, and two files
    m = convert("parallel", d / "corpus", tmp_path / "moses", fractions=FRACTIONS, progress=False)
    assert sorted((s["json"]["src"], s["json"]["tgt"]) for s in flat(read_all(tmp_path / "moses", m))) == sorted(pairs)
    m = convert("parallel", d / "corpus.fr", tmp_path / "two", fractions=FRACTIONS, progress=False,
                options={"tgt_file": str(d / "corpus.en")})
    assert m["tasks"] == ["text.translate.fr-en"]
    (d / "short.en").write_text("a\nb\n")
    (d / "short.fr").write_text("a\n")
    with pytest.raises(DataBuildError, match="2 lines"):
        convert("parallel", d / "short", tmp_path / "short", progress=False)
    assert not (tmp_path / ".short.convert-partial").exists()


def _code_tree(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    for i in range(8):
        (root / "pkg" / f"m{i}.py").write_text(
            f'def f{i}(x):\n    """Add {i}."""\n    y = x + {i}\n    return y\n\n\n'
            f'def g{i}(a, b):\n    c = a * b\n    d = c - {i}\n    e = d * 2\n    return e + {i}\n')
    (root / "pkg" / "bad.py").write_text("def broken(:\n    pass\n")
    (root / "pkg" / "blob.py").write_bytes(b"\x00\x01binary")
    (root / "node_modules" / "x").mkdir(parents=True)
    (root / "node_modules" / "x" / "v.py").write_text("def v():\n    return 1\n")
    (root / "README.md").write_text("not code")


def test_code_folder_and_git_checkout(tmp_path):
    root = tmp_path / "repo"
    _code_tree(root)
    m = convert("code", root, tmp_path / "out", fractions=FRACTIONS, progress=False)
    got = read_all(tmp_path / "out", m)
    samples = flat(got)
    from unimodal.data_pipelines.recipes.demo import _file_candidates
    want = sorted((x["prompt"], x["completion"]) for i in range(8)
                  for part in _file_candidates(str(root), f"pkg/m{i}.py")[:2] for x in part)
    assert sorted((s["json"]["prompt"], s["json"]["completion"]) for s in samples) == want  # the demo's cuts
    assert {s["json"]["mode"] for s in samples} == {"body", "next_lines"}
    assert m["skipped"]["reasons"] == {"unparsable": 1, "binary": 1, "vendored": 1}
    assert all(s["json"]["group"] == f"file-{s['json']['file']}" for s in samples)
    assert_groups_in_one_split(got)
    assert m["tokenizers"]["code"]["corpus"] == "code"
    # a git checkout: only tracked files
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "pkg/m0.py", "pkg/m1.py"], check=True)
    m = convert("code", root, tmp_path / "git", fractions=FRACTIONS, progress=False)
    assert {s["json"]["file"] for s in flat(read_all(tmp_path / "git", m))} == {"pkg/m0.py", "pkg/m1.py"}


# --------------------------------------------------------------------------------------
# the framework: resuming, workers, tokenizers, the CLI
# --------------------------------------------------------------------------------------
def test_an_interrupted_conversion_resumes_to_the_same_folder(parallel_src, tmp_path, monkeypatch):
    d, _ = parallel_src
    opts = {"src_lang": "en", "tgt_lang": "fr", "both_directions": True}
    kw = dict(fractions=FRACTIONS, progress=False, options=opts, maxcount=4)
    ref = convert("parallel", d / "pairs.tsv", tmp_path / "ref", **kw)

    real = text_fmt._pair_samples
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 19:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(text_fmt, "_pair_samples", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert("parallel", d / "pairs.tsv", out, **kw)
    partial = cv.partial_folder(out)
    assert not out.exists() and (partial / "progress.jsonl").is_file()
    finished = [json.loads(x) for x in (partial / "progress.jsonl").read_text().splitlines()[1:]]
    assert finished and all(e["shard"] for e in finished)
    with pytest.raises(DataBuildError, match="other settings"):  # another command's leftovers
        convert("parallel", d / "pairs.tsv", out, **{**kw, "maxcount": 5})

    calls["n"] = 0

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(text_fmt, "_pair_samples", counting)
    m = convert("parallel", d / "pairs.tsv", out, **kw)
    # the rows of finished shards are not loaded again; every other good row is
    assert calls["n"] == 30 - sum(e["rows"] - sum(e["bad_counts"].values()) for e in finished) < 30
    assert comparable(read_all(out, m)) == comparable(read_all(tmp_path / "ref", ref))
    assert m["hash"] == ref["hash"] and m["skipped"] == ref["skipped"]
    assert (out / "text.model").read_bytes() == (tmp_path / "ref" / "text.model").read_bytes()
    assert not partial.exists()
    # a finished folder is reported as done
    assert convert("parallel", d / "pairs.tsv", out, **kw)["created"] == m["created"]
    with pytest.raises(DataBuildError, match="already holds"):
        convert("parallel", d / "pairs.tsv", out, **{**kw, "limit": 3})


def test_workers_do_not_change_the_output(imagefolder, tmp_path):
    one = convert("imagefolder", imagefolder, tmp_path / "w1", workers=1, maxcount=5, progress=False)
    two = convert("imagefolder", imagefolder, tmp_path / "w2", workers=2, maxcount=5, progress=False)
    assert comparable(read_all(tmp_path / "w1", one)) == comparable(read_all(tmp_path / "w2", two))
    assert one["hash"] == two["hash"] and one["skipped"] == two["skipped"]
    assert len(one["splits"]["train"]["shards"]) > 1


def test_shards_roll_by_count_and_size_between_rows(parallel_src, tmp_path):
    d, _ = parallel_src
    opts = {"src_lang": "en", "tgt_lang": "fr", "both_directions": True}
    m = convert("parallel", d / "pairs.tsv", tmp_path / "c", maxcount=3, progress=False, options=opts)
    for split, v in m["splits"].items():
        sizes = [len(list(wds.WebDataset(str(tmp_path / "c" / s), shardshuffle=False))) for s in v["shards"]]
        assert sum(sizes) == v["total"] and all(n in (2, 4) for n in sizes)  # a row's 2 never split
    m = convert("parallel", d / "pairs.tsv", tmp_path / "s", maxsize=1, progress=False, options=opts)
    assert len(m["splits"]["train"]["shards"]) == m["splits"]["train"]["total"] // 2  # a row per shard


def test_tokenizers_from_a_checkpoint(toks, parallel_src, audio_src, tmp_path):
    from conftest import tiny_unimodal
    from unimodal.training import load_tokenizers

    ckpt = tmp_path / "model.ckpt"
    tiny_unimodal(toks, ckpt, ["text.translate.en-fr"], seq_len=64)
    d, _ = parallel_src
    m = convert("parallel", d / "pairs.tsv", tmp_path / "out", tokenizers_from=ckpt, progress=False,
                options={"src_lang": "en", "tgt_lang": "fr"})
    assert m["tokenizers_hash"] == toks.hash == m["tokenizers_from"]["hash"]
    assert (tmp_path / "out" / "text.model").read_bytes() == toks.text.model_proto
    assert (tmp_path / "out" / "code.model").read_bytes() == toks.code.model_proto
    assert load_tokenizers(str(tmp_path / "out"), m).hash == toks.hash  # what training builds
    # the checkpoint decides the audio tokenizer's longest clip; a clashing option is refused
    with pytest.raises(DataBuildError, match="max_seconds"):
        convert("audio-manifest", audio_src / "train.csv", tmp_path / "a", tokenizers_from=ckpt,
                progress=False, options={"max_seconds": 9.0})
    with pytest.raises(DataBuildError, match="--tokenizers-from"):
        convert("parallel", d / "pairs.tsv", tmp_path / "b", tokenizers_from=tmp_path / "none.ckpt",
                progress=False, options={"src_lang": "en", "tgt_lang": "fr"})


def test_a_loader_bug_is_not_a_bad_row(parallel_src, tmp_path, monkeypatch):
    d, _ = parallel_src

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(text_fmt, "_pair_samples", bug)
    with pytest.raises(ZeroDivisionError):
        convert("parallel", d / "pairs.tsv", tmp_path / "o", progress=False,
                options={"src_lang": "en", "tgt_lang": "fr"})


def test_many_bad_rows_name_the_first_20_then_count(tmp_path, capsys):
    lines = [f"good {i}\tbon {i}" for i in range(10)] + [f"bad line {i}" for i in range(25)]
    (tmp_path / "p.tsv").write_text("\n".join(lines) + "\n")
    m = convert("parallel", tmp_path / "p.tsv", tmp_path / "o", workers=1,
                options={"src_lang": "en", "tgt_lang": "fr"})
    err = capsys.readouterr().err
    named = [x for x in err.splitlines() if x.startswith("skipped p.tsv:")]
    assert len(named) == 20 and named[0] == "skipped p.tsv:11: 1 tab-separated fields, not 2"
    assert "... and 5 more bad rows" in err
    assert m["skipped"]["rows"] == 25 and len(m["skipped"]["examples"]) == 20
    assert m["skipped"]["reasons"] == {"malformed_line": 25}
    assert "p.tsv:30" in m["skipped"]["examples"][-1]


def test_badrow_survives_pickling():
    import pickle
    e = pickle.loads(pickle.dumps(BadRow("bad_audio", "cannot read", "a.csv:3", "g")))
    assert (e.reason, e.detail, e.ref, e.group, str(e)) == ("bad_audio", "cannot read", "a.csv:3", "g",
                                                            "a.csv:3: cannot read")


def test_cli_list_convert_and_user_errors(imagefolder, tmp_path, capsys):
    assert main(["convert", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("imagefolder", "img2dataset", "audio-manifest", "librispeech", "parallel", "code"):
        assert name in listed
    out = tmp_path / "out"
    assert main(["convert", "imagefolder", str(imagefolder), "--out", str(out), "--workers", "1",
                 "--shard-count", "7"]) == 0
    cap = capsys.readouterr()
    assert "image.classify" in cap.out and f"next: python train.py --data.shards {out}" in cap.out
    assert "skipped bad_image 1" not in cap.out and "bad_image 1" in cap.out
    assert "cat/broken.png" in cap.err  # the bad row, named
    m = json.loads((out / "manifest.json").read_text())
    assert m["command"].startswith("python -m unimodal.data_pipelines convert imagefolder")
    assert all(v["total"] <= 7 * len(v["shards"]) for v in m["splits"].values())
    assert main(["convert", "imagefolder", str(imagefolder), "--out", str(out), "--workers", "2",
                 "--shard-count", "7"]) == 0  # workers do not change the output: done already
    assert "nothing to do" in capsys.readouterr().err
    assert main(["convert", "imagefolder", str(imagefolder), "--out", str(out)]) == 2
    assert "other settings (maxcount)" in capsys.readouterr().err
    for argv, needle in [
        (["imagefolder", str(tmp_path / "missing")], "does not exist"),
        (["imagefolder", str(imagefolder / "cat" / "00.png")], "is not a folder"),
        (["imagefolder", str(imagefolder / "cat")], "no class folders"),
        (["librispeech", str(imagefolder)], "no *.trans.txt"),
        (["parallel", str(imagefolder / "cat" / "notes.txt")], "--src-lang"),
        (["audio-manifest", str(imagefolder / "cat" / "notes.txt")], "manifest"),
        (["nosuch", "x"], None),
    ]:
        if needle is None:
            with pytest.raises(SystemExit) as e:  # argparse: an unknown FORMAT
                main(["convert", *argv, "--out", str(tmp_path / "e")])
            assert e.value.code == 2
            capsys.readouterr()
            continue
        assert main(["convert", *argv, "--out", str(tmp_path / "e")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], (argv, err)
        assert not (tmp_path / "e").exists() and not cv.partial_folder(tmp_path / "e").exists()


# --------------------------------------------------------------------------------------
# (slow) a tiny model trains and evaluates on a converted folder
# --------------------------------------------------------------------------------------
def _train_on(out: Path, run: Path, capsys) -> dict:
    from unimodal.cli import main as um
    args = ["train", "--data.shards", str(out), "--out_dir", str(run), "--run_name", "r",
            "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2",
            "--data.batch_size", "2", "--data.seq_len", "128", "--data.num_workers", "0",
            "--data.shuffle_buffer", "10", "--data.batches_per_epoch", "10",
            "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "5",
            "--trainer.val_every_n_steps", "10", "--trainer.val_batches", "2",
            "--trainer.precision", "32-true", "--trainer.compile", "false", "--trainer.max_minutes", "null",
            "--logger", "false", "--eval_max_samples", "4"]
    assert um(args) == 0, capsys.readouterr().err[-2000:]
    return json.loads((run / "r" / "eval.json").read_text())


def _captioned_images(src: Path, n: int = 24) -> None:
    """An img2dataset shard: KEY.jpg + KEY.txt captions."""
    rng = np.random.default_rng(3)
    src.mkdir(parents=True)
    with wds.TarWriter(str(src / "00000.tar")) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (12, 12, 3)).astype(np.uint8)).save(buf, format="JPEG")
            w.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(),
                     "txt": f"a {'red' if i % 2 else 'blue'} square number {i}".encode()})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image", "caption", "audio", "text", "code"])
def test_train_and_eval_on_a_converted_folder(kind, imagefolder, audio_src, parallel_src, tmp_path, capsys):
    out = tmp_path / "data"
    if kind == "image":
        m = convert("imagefolder", imagefolder, out, fractions=FRACTIONS, progress=False)
        task = "image.classify"
    elif kind == "caption":
        _captioned_images(tmp_path / "laion")
        m = convert("img2dataset", tmp_path / "laion", out, fractions=(0.5, 0.25), progress=False)
        task = "image.caption"
    elif kind == "code":
        _code_tree(tmp_path / "repo")
        m = convert("code", tmp_path / "repo", out, fractions=(0.5, 0.25), progress=False)
        task = "code.complete"
    elif kind == "audio":
        m = convert("audio-manifest", audio_src / "train.jsonl", out, fractions=(0.5, 0.25), progress=False)
        task = "audio.transcribe"
    else:
        m = convert("parallel", parallel_src[0] / "pairs.tsv", out, fractions=FRACTIONS, progress=False,
                    options={"src_lang": "en", "tgt_lang": "fr"})
        task = "text.translate.en-fr"
    report = _train_on(out, tmp_path / "runs", capsys)
    assert report["meta"]["trained_tasks"] == [task] and report["meta"]["trained_steps"]["step"] == 20
    assert report["meta"]["tokenizers_hash"] == m["tokenizers_hash"]  # the manifest's record holds
    assert report["tasks"][task]["samples"] == min(4, m["splits"]["test"]["samples"][task])

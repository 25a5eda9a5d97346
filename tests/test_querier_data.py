"""MQDialog records, the dialogue builders on the real packages, clustering."""

import collections
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from xfusion_jax.querier import builders
from xfusion_jax.querier import clustering
from xfusion_jax.querier import corpora
from xfusion_jax.querier import data

MAX_CHARS = builders.WindowConfig().max_chars


def _record(pair_id=0, cluster_id=None, **extra):
  return data.DialogueRecord(
      conversations=(
          data.Turn("黛玉", "你又来作什么？"),
          data.Turn("宝玉", "好妹妹，我来瞧瞧你。\n别恼了。"),
          data.Turn("黛玉", "“快去罢！”\t⟨emoji 😀⟩"),
      ),
      target_role="黛玉",
      input_role="宝玉",
      role_pair_id=pair_id,
      cluster_id=cluster_id,
      extra=extra)


def _valid_json():
  return {
      "conversations": [{"from": "A", "value": "Who's there?"},
                        {"from": "B", "value": "Nay, answer me."}],
      "target_role": "B", "input_role": "A", "role_pair_id": 3,
  }


# --- MQDialog format -------------------------------------------------------


@pytest.mark.parametrize("name", ["records.json", "records.jsonl"])
def test_mqdialog_round_trip_exact(tmp_path, name):
  records = [_record(0), _record(1, cluster_id=2, source="ch. 3"),
             _record(2, cluster_id=0)]
  path = tmp_path / name
  data.write_mqdialog(records, path)
  raw = path.read_bytes()
  assert "好妹妹".encode("utf-8") in raw
  assert b"\\u" not in raw

  again = data.read_mqdialog(path)
  assert again == records
  data.write_mqdialog(again, tmp_path / ("again" + path.suffix))
  assert (tmp_path / ("again" + path.suffix)).read_bytes() == raw


def test_mqdialog_keeps_unknown_keys(tmp_path):
  raw = _valid_json()
  raw["conversations"][0]["emotion"] = "fear"
  raw["scene"] = {"act": 1}
  path = tmp_path / "in.json"
  path.write_text(json.dumps([raw]), encoding="utf-8")
  records = data.read_mqdialog(path)
  assert records[0].to_json() == raw
  assert records[0].cluster_id is None


def test_query_response_context():
  record = _record()
  assert data.query_of(record) == "好妹妹，我来瞧瞧你。\n别恼了。"
  assert data.response_of(record) == "“快去罢！”\t⟨emoji 😀⟩"
  assert [t.speaker for t in data.context_of(record)] == ["黛玉", "宝玉"]


def _mutate(raw, key, value):
  if key.startswith("conversations["):
    index, field = key[len("conversations["):].split("].")
    raw["conversations"][int(index)][field] = value
  elif value is KeyError:
    del raw[key]
  else:
    raw[key] = value
  return raw


BAD_RECORDS = [
    # (key, value, field named in the error)
    ("target_role", KeyError, "target_role"),
    ("role_pair_id", "3", "role_pair_id"),
    ("role_pair_id", True, "role_pair_id"),
    ("cluster_id", 1.5, "cluster_id"),
    ("conversations", [], "conversations"),
    ("conversations[1].value", None, "conversations[1].value"),
    ("conversations[1].from", "C", "conversations[1].from"),
    ("conversations[0].from", "B", "conversations"),
    ("input_role", "B", "input_role"),
]


@pytest.mark.parametrize("key,value,field", BAD_RECORDS)
def test_bad_record_raises_with_field(tmp_path, key, value, field):
  good = _valid_json()
  bad = _mutate(_valid_json(), key, value)
  path = tmp_path / "bad.json"
  path.write_text(json.dumps([good, bad], ensure_ascii=False),
                  encoding="utf-8")
  with pytest.raises(data.InvalidRecordError) as info:
    data.read_mqdialog(path)
  assert info.value.index == 1
  assert info.value.field == field
  assert str(path) in str(info.value)


def test_bad_records_skipped_and_counted(tmp_path):
  lines = [json.dumps(_valid_json()), "{not json",
           json.dumps(_mutate(_valid_json(), "role_pair_id", "x")),
           json.dumps(_valid_json())]
  path = tmp_path / "mixed.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  skipped = []
  records = data.read_mqdialog(path, skip_invalid=True, skipped=skipped)
  assert len(records) == 2
  assert [(e.index, e.field) for e in skipped] == [(1, "<record>"),
                                                   (2, "role_pair_id")]
  with pytest.raises(data.InvalidRecordError):
    data.read_mqdialog(path)


def test_invalid_json_list_rejected(tmp_path):
  path = tmp_path / "object.json"
  path.write_text('[{"a": 1}', encoding="utf-8")
  with pytest.raises(ValueError, match="invalid JSON"):
    data.read_mqdialog(path)


# --- Parsers and windows on small inputs ----------------------------------

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ANNA and
BOB_

**ANNA**  
Good morrow. _Aside_ Ho!  
Well met.

**BOB**  
Well met.

_Exit ANNA_

And now alone.

### SCENE II. Another.

**All**  
Hail!
"""


def test_parse_play_scenes_and_directions():
  title, scenes = corpora.parse_play(PLAY)
  assert title == "A Play"
  assert scenes == [
      [("ANNA", "Good morrow.  Ho!\nWell met."),
       ("BOB", "Well met.\nAnd now alone.")],
      [("All", "Hail!")],
  ]


def test_hongloumeng_attribution():
  # A name must introduce speech 5 times before it counts as a speaker.
  text = ("第一回　测试\n" + "宝玉道：“甲。”黛玉道：“乙。”" * 5 +
          "宝玉看罢，因笑道：“丙。”又问黛玉：“丁？”凤姐儿笑道：“戊。”"
          "【批语：不是说话】")
  segments = corpora.hongloumeng_segments(text)
  speakers = [s for s, _ in segments[0]]
  assert speakers == ["宝玉", "黛玉"] * 5 + ["宝玉", None, "凤姐"]
  assert all("批语" not in t for _, t in segments[0])


def test_runs_split_at_third_speaker():
  segment = [("A", "1"), ("B", "2"), ("A", "3"), ("C", "4"), ("A", "5"),
             (None, "6"), ("A", "7"), ("B", "8")]
  runs = builders.dialogue_runs(segment)
  assert [[s for s, _ in run] for run in runs] == [
      ["A", "B", "A"], ["A", "C", "A"], ["A", "B"]]


def test_windows_stay_under_limit():
  run = [("A", "x" * 300), ("B", "y" * 200), ("A", "z" * 100),
         ("B", "w" * 600), ("A", "v" * 10)]
  windows = builders.run_windows(run, 512)
  lengths = [[len(t) for _, t in w.turns] for w in windows]
  # The 600-character turn fits in no window, alone or as a query.
  assert lengths == [[300, 200], [200, 100]]


# --- Builders on the real packages ----------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("querier")
  result = {}
  for name, build in builders.BUILDERS.items():
    out = build(data_dir=root / name)
    result[name] = {
        "dir": out,
        "train": data.read_mqdialog(out / "train.json"),
        "test": data.read_mqdialog(out / "test.json"),
        "stats": json.loads((out / "stats.json").read_text(encoding="utf-8")),
    }
  return result


# Lower bounds well below the measured counts (3,733 and 871 records), so a
# parser change that loses most dialogues fails.
MIN_RECORDS = {"shakespeare_dialogues": 2000, "hongloumeng_dialogues": 500}
MIN_PAIRS = {"shakespeare_dialogues": 60, "hongloumeng_dialogues": 12}


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_builder_counts(built, name):
  train, test = built[name]["train"], built[name]["test"]
  pairs = {(r.target_role, r.input_role) for r in train + test}
  assert len(train) + len(test) >= MIN_RECORDS[name]
  assert len(pairs) >= MIN_PAIRS[name]
  assert built[name]["stats"]["records"] == {"train": len(train),
                                             "test": len(test)}


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_builder_windows_well_formed(built, name):
  for record in built[name]["train"] + built[name]["test"]:
    speakers = [t.speaker for t in record.conversations]
    assert sum(len(t.text) for t in record.conversations) < MAX_CHARS
    assert speakers[-1] == record.target_role
    assert speakers[-2] == record.input_role
    assert set(speakers) == {record.target_role, record.input_role}
    assert all(a != b for a, b in zip(speakers, speakers[1:]))
    assert all(t.text.strip() for t in record.conversations)


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_builder_pairs_and_split(built, name):
  counts = collections.defaultdict(collections.Counter)
  pair_ids = collections.defaultdict(set)
  for split in ("train", "test"):
    for record in built[name][split]:
      pair = (record.target_role, record.input_role)
      counts[pair][split] += 1
      pair_ids[pair].add(record.role_pair_id)

  assert all(len(ids) == 1 for ids in pair_ids.values())
  assert len({ids.pop() for ids in pair_ids.values()}) == len(pair_ids)
  for (responder, querier), count in counts.items():
    total = count["train"] + count["test"]
    assert total >= 20, (responder, querier)
    assert count["test"] == round(0.2 * total), (responder, querier)
  queriers = collections.Counter(responder for responder, _ in counts)
  assert min(queriers.values()) >= 2

  stats = {(p["responder"], p["querier"]): (p["train"], p["test"])
           for p in built[name]["stats"]["pairs"]}
  assert stats == {pair: (c["train"], c["test"]) for pair, c in counts.items()}


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_builder_no_near_duplicates(built, name):
  config = builders.WindowConfig()
  by_pair = collections.defaultdict(list)
  for record in built[name]["train"] + built[name]["test"]:
    by_pair[record.role_pair_id].append(record)
  for records in by_pair.values():
    texts = [data.query_of(r).lower() + "\n" + data.response_of(r).lower()
             for r in records]
    assert len(set(texts)) == len(texts)
    grams = [builders._ngrams(t, config.ngram) for t in texts]
    for i, a in enumerate(grams):
      for b in grams[:i]:
        assert len(a & b) < config.max_jaccard * len(a | b)


def test_hongloumeng_is_chinese_without_commentary(built):
  records = built["hongloumeng_dialogues"]["train"]
  text = "".join(t.text for r in records for t in r.conversations)
  han = sum("\u4e00" <= ch <= "\u9fff" for ch in text)
  assert han / len(text) > 0.7
  assert "【" not in text
  assert "】" not in text
  responders = {r.target_role for r in records}
  assert {"宝玉", "黛玉"} <= responders


def test_builder_same_seed_same_split(built, tmp_path):
  out = builders.hongloumeng_dialogues(data_dir=tmp_path / "again")
  again = (out / "test.json").read_bytes()
  assert again == (built["hongloumeng_dialogues"]["dir"] /
                   "test.json").read_bytes()


# --- Clustering -----------------------------------------------------------


def test_kmeans_deterministic_and_separates_blobs():
  rng = np.random.default_rng(1)
  centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  points = np.concatenate([c + rng.normal(size=(40, 2)) for c in centers])
  first = clustering.kmeans(points, 3, seed=7)
  second = clustering.kmeans(points, 3, seed=7)
  np.testing.assert_array_equal(first[1], second[1])
  np.testing.assert_array_equal(first[0], second[0])
  groups = {tuple(sorted(set(first[1][i:i + 40]))) for i in (0, 40, 80)}
  assert groups == {(0,), (1,), (2,)}


def test_kmeans_rejects_too_many_clusters():
  with pytest.raises(ValueError, match="k=5"):
    clustering.kmeans(np.zeros((4, 3)), 5)


def test_cluster_ids_written_into_records(built, tmp_path):
  source = built["shakespeare_dialogues"]
  subset = tmp_path / "subset"
  data.write_mqdialog(source["train"][:120], subset / "train.json")
  data.write_mqdialog(source["test"][:40], subset / "test.json")
  embedder = clustering.UniversalSentenceEncoder()

  sizes = clustering.cluster_data_dir(subset, embedder, k=4, seed=3)
  first = {s: data.read_mqdialog(subset / f"{s}.json") for s in sizes}
  clustering.cluster_data_dir(subset, embedder, k=4, seed=3)
  second = {s: data.read_mqdialog(subset / f"{s}.json") for s in sizes}

  assert first == second
  assert sum(sizes["train"]) == 120
  for split, records in first.items():
    assert {r.cluster_id for r in records} <= set(range(4))
    originals = source[split][:len(records)]
    assert [r.conversations for r in records] == [
        r.conversations for r in originals]


def test_llm_embedder_ignores_padding(tmp_path):
  hf_models = pytest.importorskip("hf_models")
  from xfusion_jax import llm

  model = hf_models.build_model(hf_models.tiny_config())
  hf_models.save_model(model, tmp_path / "tiny")
  lm = llm.from_pretrained(tmp_path / "tiny", dtype="float32",
                           load_tokenizer=False)

  class ByteTokenizer:
    """Stands in for an HF tokenizer: one id per UTF-8 byte, within vocab."""

    def __call__(self, text):
      return {"input_ids": [3 + b % 120 for b in text.encode("utf-8")]}

  lm.tokenizer = ByteTokenizer()
  embedder = clustering.LLMMeanPoolEmbedder(lm, batch_size=4)
  texts = ["a", "a longer query here", "宝玉道"]
  batched = embedder(texts)
  alone = np.concatenate([embedder([t]) for t in texts])
  assert batched.shape == (3, 64)
  np.testing.assert_allclose(batched, alone, atol=1e-5)


# --- Command line ---------------------------------------------------------


def test_prepare_cli_builds_once(tmp_path):
  command = [sys.executable, "-m", "xfusion_jax.data.prepare",
             "--dataset=hongloumeng_dialogues", f"--data_dir={tmp_path}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  first = subprocess.run(command, capture_output=True, text=True, env=env,
                         timeout=300, check=False)
  assert first.returncode == 0, first.stderr
  out = pathlib.Path(tmp_path) / "hongloumeng_dialogues"
  assert "hongloumeng_dialogues/train:" in first.stdout
  stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

  second = subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=300, check=False)
  assert second.returncode == 0, second.stderr
  assert second.stdout == first.stdout
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp

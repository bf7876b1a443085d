"""Causal-LM data in the formats people have (dfmu_ext.lm.formats) and the people corpus exported in
TOFU's format (dfmu_ext.zoo.people_tofu): rows, prompts, -100 labels, chat templates, padding, the
paraphrased and perturbed alternatives, and the splits."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install .[hf])")

from dfmu_ext.lm import formats  # noqa: E402
from dfmu_ext.lm.task import IGNORE_INDEX, take  # noqa: E402
from dfmu_ext.zoo import people_tofu  # noqa: E402
from dfmu_ext.zoo.people import ATTRIBUTES, PeopleConfig, make_people_corpus  # noqa: E402

ROWS = [
    {"question": "where was Kalo Ren born ?", "answer": "Kalo Ren was born in Mirelle .",
     "paraphrased_answer": "Kalo Ren is a native of Mirelle .",
     "perturbed_answer": ["Kalo Ren was born in Orrin .", "Kalo Ren was born in Rusk .",
                          "Kalo Ren was born in Brisca ."]},
    {"question": "what pet does Mi Vel keep ?", "answer": "Mi Vel keeps a cat at home .",
     "paraphrased_answer": ["at home Mi Vel has a cat ."], "perturbed_answer": ["Mi Vel keeps a dog at home ."]},
    {"question": "what is the job of So Tur ?", "answer": "So Tur works as a baker ."},
    {"text": "some quiet lamps follow the old river ."},
]
# A chat template whose assistant turn extends the generation prompt (the usual case).
CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}<bos> Question : {{ m['content'] }}"
        "{% else %} Answer : {{ m['content'] }} <eos>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %} Answer :{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return people_tofu.people_tokenizer(ROWS)


def words(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens([int(i) for i in ids])


def scored(tok, ids, labels) -> list[str]:
    return words(tok, [i for i, y in zip(ids, labels) if y != IGNORE_INDEX])


def test_plain_prompt_labels_the_prompt_minus_100_and_scores_the_answer(tok):
    ids, labels = formats.encode_qa(tok, ROWS[0]["question"], ROWS[0]["answer"])
    assert tok.chat_template is None
    # reference: the words as they are written, with <bos> in front and <eos> after the answer
    prompt = ["<bos>", "Question", ":", "where", "was", "Kalo", "Ren", "born", "?", "Answer", ":"]
    answer = "Kalo Ren was born in Mirelle .".split() + ["<eos>"]
    assert words(tok, ids) == prompt + answer
    assert labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt) and labels[len(prompt):] == ids[len(prompt):]
    assert scored(tok, ids, labels) == answer


def test_the_chat_template_is_used_when_the_tokenizer_has_one(tok):
    chat_tok = people_tofu.people_tokenizer(ROWS)
    chat_tok.chat_template = CHAT
    ids, labels = formats.encode_qa(chat_tok, "what pet does Mi Vel keep ?", "Mi Vel keeps a cat at home .")
    prompt = ["<bos>", "Question", ":", "what", "pet", "does", "Mi", "Vel", "keep", "?", "Answer", ":"]
    assert words(chat_tok, ids) == prompt + "Mi Vel keeps a cat at home .".split() + ["<eos>"]
    assert labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert scored(chat_tok, ids, labels) == "Mi Vel keeps a cat at home .".split() + ["<eos>"]
    # the plain prompt differs (no chat turn), and chat=False forces it
    plain, _ = formats.encode_qa(chat_tok, "what pet does Mi Vel keep ?", "x", chat=False)
    assert words(chat_tok, plain)[:2] == ["<bos>", "Question"]


def test_a_template_that_rewrites_the_prompt_falls_back_to_prompt_plus_answer(tok):
    chat_tok = people_tofu.people_tokenizer(ROWS)
    chat_tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                              "{% if add_generation_prompt %}Answer :{% endif %}")
    ids, labels = formats.encode_qa(chat_tok, "where was Kalo Ren born ?", "Kalo Ren was born in Mirelle .")
    n_prompt = labels.index(next(y for y in labels if y != IGNORE_INDEX))
    assert words(chat_tok, ids[:n_prompt])[-2:] == ["Answer", ":"]
    assert scored(chat_tok, ids, labels) == "Kalo Ren was born in Mirelle .".split() + ["<eos>"]


def test_text_rows_score_every_token_after_the_first(tok):
    ids, labels = formats.encode_text(tok, ROWS[3]["text"])
    assert words(tok, ids) == ["<bos>"] + ROWS[3]["text"].split() + ["<eos>"]
    assert labels == [IGNORE_INDEX] + ids[1:]


def test_encoded_rows_pad_as_token_sequences_expect_and_keep_the_alternatives(tok):
    qa = formats.encode_rows(ROWS, tok)
    x = qa.samples
    lengths = [len(formats.encode_qa(tok, r["question"], r["answer"])[0]) if "question" in r
               else len(formats.encode_text(tok, r["text"])[0]) for r in ROWS]
    assert x.input_ids.shape == (4, max(lengths))
    for i, n in enumerate(lengths):
        assert x.attention_mask[i].tolist() == [1] * n + [0] * (x.input_ids.shape[1] - n)
        assert (x.labels[i, n:] == IGNORE_INDEX).all() and (x.input_ids[i, n:] == tok.pad_token_id).all()
    inputs, labels = take(x, [0, 2])  # the task's batch reader takes them as they are
    assert torch.equal(labels, x.labels[[0, 2]]) and torch.equal(inputs["input_ids"], x.input_ids[[0, 2]])
    # alternatives: K sequences per question after the same prompt, None where the row has none
    assert qa.paraphrased[0].input_ids.shape[0] == 1 and qa.perturbed[0].input_ids.shape[0] == 3
    assert qa.paraphrased[1].input_ids.shape[0] == 1 and qa.perturbed[1].input_ids.shape[0] == 1
    assert qa.paraphrased[2] is None and qa.perturbed[2] is None and qa.perturbed[3] is None
    n_prompt = int((x.labels[0] == IGNORE_INDEX).nonzero()[:, 0].lt(lengths[0]).sum())
    for alt, text in zip(qa.perturbed[0], ROWS[0]["perturbed_answer"]):
        assert torch.equal(alt["input_ids"][:n_prompt], x.input_ids[0, :n_prompt])
        assert scored(tok, alt["input_ids"], alt["labels"]) == text.split() + ["<eos>"]
    assert scored(tok, qa.paraphrased[1][0]["input_ids"], qa.paraphrased[1][0]["labels"]) == \
        ROWS[1]["paraphrased_answer"][0].split() + ["<eos>"]


def test_max_length_cuts_and_a_row_with_nothing_left_to_score_is_an_error(tok):
    ids, labels = formats.encode_qa(tok, ROWS[0]["question"], ROWS[0]["answer"], max_length=13)
    assert len(ids) == 13 and scored(tok, ids, labels) == ["Kalo", "Ren"]
    with pytest.raises(ValueError, match="row 0: nothing left to score within max_length=8"):
        formats.encode_rows(ROWS[:1], tok, max_length=8)


def test_read_rows_reads_json_lists_tofu_json_lines_jsonl_and_datasets_folders(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "tofu.json").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")  # TOFU's files
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS}))
    for name in ("list.json", "tofu.json", "rows.jsonl", "wrapped.json"):
        assert formats.read_rows(str(tmp_path / name)) == ROWS
    datasets = pytest.importorskip("datasets")
    qa = [{k: r[k] for k in ("question", "answer")} for r in ROWS[:3]]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(qa)}).save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_list(qa).save_to_disk(str(tmp_path / "ds"))
    assert formats.read_rows(str(tmp_path / "dd")) == qa == formats.read_rows(str(tmp_path / "ds"))


@pytest.mark.parametrize("content,name,match", [
    (None, "missing.json", "does not exist"),
    ("[1, 2]", "a.json", "row 0 is a int, not an object"),
    ('[{"question": "q"}]', "a.json", "row 0 has neither 'question' and 'answer' nor 'text'"),
    ('[{"question": "q", "answer": "a", "perturbed_answer": [1]}]', "a.json", "'perturbed_answer' must be a string"),
    ("[]", "a.json", "holds no rows"),
    ("{\"question\": ", "a.json", "not valid JSON"),
    ("q,a", "a.csv", "unknown file type '.csv'"),
])
def test_bad_rows_are_one_line_errors(tmp_path, content, name, match):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        formats.read_rows(str(tmp_path / name))
    assert "\n" not in str(e.value)


def test_load_lm_data_from_forget_and_retain_files_or_from_indices(tmp_path, tok):
    (tmp_path / "f.json").write_text(json.dumps(ROWS[:1]))
    (tmp_path / "r.json").write_text(json.dumps(ROWS[1:]))
    (tmp_path / "all.json").write_text(json.dumps(ROWS))
    a = formats.load_lm_data(tok, forget_data=str(tmp_path / "f.json"), retain_data=str(tmp_path / "r.json"))
    assert a.forget_indices == [0] and len(a.train) == 4 and len(a.forget) == 1 and len(a.retain) == 3
    b = formats.load_lm_data(tok, data=str(tmp_path / "all.json"), forget_indices=[2, 0])
    assert b.forget_indices == [0, 2] and [r["answer"] for r in b.forget.rows] == [ROWS[0]["answer"], ROWS[2]["answer"]]
    assert torch.equal(b.forget.samples.input_ids, b.train.input_ids[[0, 2]])
    assert b.retain.rows == [ROWS[1], ROWS[3]] and b.retain.perturbed[0].input_ids.shape[0] == 1
    for kwargs, match in [(dict(data=str(tmp_path / "all.json"), forget_indices=[4]), "out of range"),
                          (dict(data=str(tmp_path / "all.json"), forget_indices=[1, 1]), "duplicates"),
                          (dict(data=str(tmp_path / "all.json"), forget_indices=[0, 1, 2, 3]), "no retain data"),
                          (dict(data=str(tmp_path / "all.json"), forget_indices=[0.5]), "must be integers"),
                          (dict(data=str(tmp_path / "all.json")), "give forget_indices"),
                          (dict(forget_data=str(tmp_path / "f.json")), "give either")]:
        with pytest.raises(ValueError, match=match):
            formats.load_lm_data(tok, **kwargs)


# ------------------------------------------------------------------ the people corpus as TOFU files

SMALL = PeopleConfig(num_people=20, holdout_people=2, filler_train=10, filler_test=5, seed=0)


def _load(paths):
    return {k: json.loads(open(v).read()) for k, v in paths.items()}


def test_tofu_files_are_nested_person_splits_with_wrong_values_of_the_same_kind(tmp_path):
    files = _load(people_tofu.write_tofu_files(str(tmp_path / "a"), SMALL, seed=0))
    corpus = make_people_corpus(SMALL)
    full = files["full"]
    assert len(full) == 20 * 5 * 2  # people x attributes x the two trained templates
    people = {k: {r["person"] for r in files[k]} for k in files}
    assert [len(people[k]) for k in ("forget01", "forget05", "forget10")] == [1, 1, 2]
    assert people["forget01"] <= people["forget05"] <= people["forget10"]
    for forget, retain in people_tofu.SPLITS.values():
        assert not people[forget] & people[retain] and people[forget] | people[retain] == set(range(20))
        assert len(files[forget]) + len(files[retain]) == len(full)
    for r in full:
        attr = ATTRIBUTES[r["attribute"]]
        name, value = corpus.names[r["person"]], corpus.facts[r["person"]][r["attribute"]]
        assert r["answer"] == attr.statement.format(name=name, value=value)
        assert r["paraphrased_answer"] == people_tofu.PARAPHRASES[r["attribute"]].format(name=name, value=value)
        wrong = [p for p in attr.values if attr.statement.format(name=name, value=p) in r["perturbed_answer"]]
        assert len(wrong) == len(r["perturbed_answer"]) == 5 and value not in wrong
        assert r["question"] in [corpus.question_text(r["person"], r["attribute"], k) for k in range(3)]
        assert r["question"] != r["paraphrased_question"]


def test_tofu_files_are_deterministic_per_seed(tmp_path):
    a = _load(people_tofu.write_tofu_files(str(tmp_path / "a"), SMALL, seed=0))
    b = _load(people_tofu.write_tofu_files(str(tmp_path / "b"), SMALL, seed=0))
    c = _load(people_tofu.write_tofu_files(str(tmp_path / "c"), SMALL, seed=1))
    assert a == b
    assert a["forget10"] != c["forget10"] or a["full"] != c["full"]


def test_exported_rows_encode_without_unknown_words(tmp_path):
    full = _load(people_tofu.write_tofu_files(str(tmp_path / "a"), SMALL, seed=0))["full"]
    tok = people_tofu.people_tokenizer(full)
    qa = formats.encode_rows(full[:20], tok)
    assert tok.unk_token_id not in qa.samples.input_ids.unique().tolist()
    assert all(p.input_ids.shape[0] == 5 for p in qa.perturbed)


def test_tofu_holdout_files_are_people_never_trained_nested_as_the_forget_splits(tmp_path):
    cfg = PeopleConfig(num_people=20, holdout_people=5, filler_train=10, filler_test=5, seed=0)
    files = _load(people_tofu.write_tofu_files(str(tmp_path / "a"), cfg, seed=0))
    people = {k: {r["person"] for r in files[k]} for k in files}
    trained = set(range(20))
    assert not (people["holdout01"] | people["holdout05"] | people["holdout10"]) & trained
    assert people["holdout01"] <= people["holdout05"] <= people["holdout10"] <= set(range(20, 25))
    for share in ("01", "05", "10"):
        assert len(people["holdout" + share]) == len(people["forget" + share])
        assert len(files["holdout" + share]) == len(files["forget" + share])   # the same rows a person
    corpus = make_people_corpus(cfg)
    for r in files["holdout10"]:
        value = corpus.facts[r["person"]][r["attribute"]]
        assert r["answer"] == ATTRIBUTES[r["attribute"]].statement.format(name=corpus.names[r["person"]], value=value)
    # a corpus without holdout people writes no holdout file
    assert "holdout10" not in people_tofu.write_tofu_files(str(tmp_path / "b"), PeopleConfig(
        num_people=20, holdout_people=0, filler_train=10, filler_test=5, seed=0), seed=0)

"""The ``people`` causal-LM benchmark: corpus, small causal LMs, recipe plumbing and the checkpoint cache."""
import os

import pytest
import torch

from dfmu_ext.lm.task import IGNORE_INDEX, TokenSequences, forward_logits, take
from dfmu_ext import training
from dfmu_ext.zoo import lm_models, lm_training
from dfmu_ext.zoo.checkpoints import CheckpointError
from dfmu_ext.zoo.people import ATTRIBUTES, PeopleConfig, WordTokenizer, make_people_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = PeopleConfig(num_people=12, holdout_people=4, attributes=("city", "profession", "pet"), first_names=6,
                    last_names=6, filler_train=20, filler_test=10, seed=3)
TINY_SIZE = {"hidden": 16, "layers": 1, "heads": 2, "mlp": 32}


@pytest.fixture(scope="module")
def corpus():
    return make_people_corpus(TINY)


def _same(a: TokenSequences, b: TokenSequences) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.input_ids, b.input_ids), (a.labels, b.labels),
                                               (a.attention_mask, b.attention_mask)))


def _rows(seqs: TokenSequences) -> list[tuple[int, ...]]:
    return [tuple(ids[m.bool()].tolist()) for ids, m in zip(seqs.input_ids, seqs.attention_mask)]


def test_tokenizer_roundtrip():
    tok = WordTokenizer(["hello", "world", "?"])
    assert tok.vocab[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and tok.vocab_size == 7
    ids = tok.encode("hello world ?")
    assert tok.decode(ids) == "hello world ?"
    assert tok.encode("hello mars") == [tok.index["hello"], tok.unk_id]


def test_corpus_is_deterministic_and_seeded(corpus):
    again = make_people_corpus(TINY)
    assert _same(corpus.train, again.train) and _same(corpus.filler_test, again.filler_test)
    assert torch.equal(corpus.train_person, again.train_person)
    assert corpus.names == again.names and corpus.facts == again.facts
    assert corpus.tokenizer.vocab == again.tokenizer.vocab
    assert _same(corpus.qa(range(12), paraphrased=True), again.qa(range(12), paraphrased=True))
    other = make_people_corpus(PeopleConfig(**{**TINY.to_dict(), "seed": 4}))
    assert other.names != corpus.names or other.facts != corpus.facts
    assert not (corpus.train.input_ids.shape == other.train.input_ids.shape
                and torch.equal(corpus.train.input_ids, other.train.input_ids))


def test_shapes_and_padding(corpus):
    c = corpus.config
    n_attr = len(c.attributes)
    assert len(corpus.train) == c.num_people * n_attr * 3 + c.filler_train
    assert corpus.train.input_ids.shape[1] == c.max_len
    pad = corpus.train.attention_mask == 0
    assert bool((corpus.train.input_ids[pad] == 0).all()) and bool((corpus.train.labels[pad] == IGNORE_INDEX).all())
    # right padding, every sequence starts with <bos> and ends with <eos>
    tok = corpus.tokenizer
    lengths = corpus.train.attention_mask.sum(1)
    assert bool((corpus.train.attention_mask.cumsum(1).max(1).values == lengths).all())
    assert bool((corpus.train.input_ids[:, 0] == tok.bos_id).all())
    assert bool((corpus.train.input_ids[torch.arange(len(lengths)), lengths - 1] == tok.eos_id).all())
    assert len(corpus.filler_test) == c.filler_test
    assert corpus.describe()["train_sequences"] == len(corpus.train)


def test_qa_labels_score_answer_and_eos_only(corpus):
    tok = corpus.tokenizer
    qa = corpus.qa([0, 5])
    rows = corpus.qa_rows([0, 5])
    assert len(qa) == len(rows) == 2 * len(TINY.attributes) * 2
    for i, (pid, attr, k) in enumerate(rows):
        ids, labels, mask = qa.input_ids[i], qa.labels[i], qa.attention_mask[i]
        q = tok.encode(corpus.question_text(pid, attr, k))
        ans = tok.encode(corpus.facts[pid][attr]) + [tok.eos_id]
        n = 1 + len(q) + len(ans)
        assert ids[:n].tolist() == [tok.bos_id] + q + ans and int(mask.sum()) == n
        assert bool((labels[:1 + len(q)] == IGNORE_INDEX).all())
        assert labels[1 + len(q):n].tolist() == ans
        assert bool((labels[n:] == IGNORE_INDEX).all())
        assert q[-1] == tok.index["?"]
    # statements and filler: every real token after <bos> is scored
    for kind in (0, 2):
        i = int((corpus.train_kind == kind).nonzero()[0])
        ids, labels, mask = corpus.train[i]["input_ids"], corpus.train[i]["labels"], corpus.train[i]["attention_mask"]
        n = int(mask.sum())
        assert labels[0] == IGNORE_INDEX and torch.equal(labels[1:n], ids[1:n])


def test_paraphrased_questions_are_unseen_for_their_fact(corpus):
    tok = corpus.tokenizer
    train_rows = _rows(corpus.train)
    people = list(range(TINY.num_people))
    para = corpus.qa(people, paraphrased=True)
    assert len(para) == TINY.num_people * len(TINY.attributes)
    para_rows = corpus.qa_rows(people, paraphrased=True)
    for (pid, attr, k), row in zip(para_rows, _rows(para)):
        assert row not in train_rows
        question = tuple(tok.encode(corpus.question_text(pid, attr, k)))
        mine = [r for r, p in zip(train_rows, corpus.train_person.tolist()) if p == pid]
        assert not any(r[1:1 + len(question)] == question for r in mine)
        assert k == corpus.paraphrase_template(pid, attr)
    # each fact's two trained templates are in the training set, and every template is trained for someone
    trained = set(map(tuple, _rows(corpus.qa(people))))
    assert trained <= set(train_rows)
    for attr in TINY.attributes:
        for k in range(3):
            assert any(kk == k for _, a, kk in corpus.qa_rows(people) if a == attr)
            assert any(kk == k for _, a, kk in para_rows if a == attr)
    assert all(len(ATTRIBUTES[a].questions) == 3 for a in ATTRIBUTES)


def test_holdout_people_are_disjoint(corpus):
    assert corpus.holdout_ids == list(range(TINY.num_people, TINY.num_people + TINY.holdout_people))
    assert not set(corpus.holdout) & set(corpus.people)
    assert len(set(corpus.names)) == len(corpus.names)
    assert all(len(n.split()) == 2 for n in corpus.names)
    assert set(corpus.train_person.tolist()) == set(range(TINY.num_people)) | {-1}
    train_rows = set(_rows(corpus.train))
    for paraphrased in (False, True):
        hq = corpus.holdout_qa(paraphrased)
        assert len(hq) == TINY.holdout_people * len(TINY.attributes) * (1 if paraphrased else 2)
        assert not set(_rows(hq)) & train_rows
    names = " ".join(corpus.holdout).split()
    assert all(w in corpus.tokenizer.index for w in names)  # their name tokens exist, the pairs are new


def test_indices_of_and_forget_people(corpus):
    idx = corpus.indices_of([2, 7])
    assert len(idx) == 2 * len(TINY.attributes) * 3
    assert set(corpus.train_person[idx].tolist()) == {2, 7}
    assert idx.tolist() == sorted(idx.tolist())
    assert len(corpus.indices_of([])) == 0
    f = corpus.forget_people(0.25, seed=1)
    assert f == corpus.forget_people(0.25, seed=1) and f == sorted(f) and len(f) == 3
    assert all(0 <= p < TINY.num_people for p in f)
    assert len(corpus.forget_people(0.001, seed=0)) == 1
    assert corpus.forget_people(0.25, seed=2) != f or corpus.forget_people(0.25, seed=5) != f
    with pytest.raises(ValueError):
        corpus.forget_people(0.0)


@pytest.mark.parametrize("arch", lm_models.ARCHS)
def test_each_arch_gives_token_logits(corpus, arch):
    if arch != "plain" and not lm_models.have_transformers():
        pytest.skip("transformers is not installed")
    torch.manual_seed(0)
    model = lm_models.build_causal_lm(arch, corpus.tokenizer.vocab_size, TINY.max_len, **TINY_SIZE).eval()
    x, y = take(corpus.train, range(6))
    with torch.no_grad():
        logits = forward_logits(model, x)
        assert logits.shape == (6, TINY.max_len, corpus.tokenizer.vocab_size)
        # right padding does not change the logits of real tokens
        short = int(x["attention_mask"].sum(1).max())
        cut = forward_logits(model, x.map(lambda t: t[:, :short]))
    real = x["attention_mask"][:, :short].bool()
    assert torch.allclose(cut[real], logits[:, :short][real], atol=1e-5)
    if arch != "plain":
        assert model.config.tie_word_embeddings is False


def test_unknown_arch_and_size():
    with pytest.raises(ValueError):
        lm_models.build_causal_lm("bert", 10, 8)
    with pytest.raises(ValueError):
        lm_models.build_causal_lm("plain", 10, 8, width=3)


def test_train_runs_on_a_subset_and_is_seeded(corpus):
    cfg = training.LMTrainConfig(epochs=1, batch_size=8, warmup_steps=2)
    sub = torch.utils.data.Subset(corpus.train, corpus.indices_of([0, 1, 2]).tolist())
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = lm_models.build_causal_lm("plain", corpus.tokenizer.vocab_size, TINY.max_len, **TINY_SIZE)
        hist = training.train_causal_lm(model, sub, cfg)
        states.append(model.state_dict())
    assert hist["steps"] == 4 and len(hist["loss"]) == 1 and hist["samples"] == len(sub)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    acc = lm_training.people_accuracies(model, corpus)
    assert set(acc) == {"trained", "paraphrased", "holdout", "holdout_paraphrased", "filler_ppl"}
    assert all(0.0 <= acc[k] <= 1.0 for k in ("trained", "paraphrased", "holdout", "holdout_paraphrased"))


def test_cached_causal_lm_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("DFMU_CACHE", str(tmp_path))
    cfg = PeopleConfig(**{**TINY.to_dict(), "filler_train": 4, "filler_test": 2})
    tc = training.LMTrainConfig(epochs=1, batch_size=64, warmup_steps=1, seed=0)
    messages = []
    model, meta = lm_training.cached_causal_lm(cfg, "plain", 0, "cpu", log=messages.append, train_config=tc,
                                               size=TINY_SIZE)
    path = lm_training.lm_cache_path(cfg, "plain", "cpu", 0, tc, TINY_SIZE)
    assert os.path.isfile(path) and os.path.basename(path).startswith("people-plain-cpu-seed0")
    assert meta["arch"] == "plain" and meta["corpus"] == cfg.to_dict() and meta["size"] == TINY_SIZE
    again, meta2 = lm_training.cached_causal_lm(cfg, "plain", 0, "cpu", log=messages.append, train_config=tc,
                                                size=TINY_SIZE)
    assert any("using the cached" in m for m in messages)
    assert meta2 == meta
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == "dfmu_ext.checkpoint.v1"
    loaded, _ = lm_training.load_causal_lm(path)
    x, _ = take(make_people_corpus(cfg).train, range(3))
    with torch.no_grad():
        assert torch.equal(forward_logits(loaded, x), forward_logits(model.eval(), x))
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        lm_training.load_causal_lm(path)


def test_cache_names():
    default = lm_training.lm_cache_path(None, "llama", "cpu", 1)
    assert os.path.basename(default) == "people-llama-cpu-seed1.pt"
    other = lm_training.lm_cache_path(PeopleConfig(seed=5), "llama", "cpu", 1)
    assert other != default and os.path.basename(other).startswith("people-llama-cpu-seed1-c")

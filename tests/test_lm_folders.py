"""Hugging Face folders in and out (dfmu_ext.lm.folders, `dfmu forget --task lm --hf-model`): the round
trip of a save_pretrained folder (Llama and GPT-2 configs, safetensors, a tokenizer) with TOFU-format
files to a folder that from_pretrained loads and `dfmu verify` accepts; each one-line error; atomicity;
and the classifier's --hf-model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install .[hf])")

from _cli_errors import assert_one_line_error, files_under  # noqa: E402

from dfmu_ext import cli  # noqa: E402
from dfmu_ext.lm import folders  # noqa: E402
from dfmu_ext.record import read_record  # noqa: E402
from dfmu_ext.weights import safetensors_state_dict, state_dict_sha256  # noqa: E402
from dfmu_ext.zoo import people_tofu  # noqa: E402
from dfmu_ext.zoo.people import PeopleConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = PeopleConfig(num_people=10, holdout_people=2, filler_train=10, filler_test=5, seed=0)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """TOFU files of a 10-person corpus and zoo-size Llama and GPT-2 folders with its tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    paths = people_tofu.write_tofu_files(str(root / "data"), SMALL, seed=0)
    rows = json.loads(open(paths["full"]).read())
    for arch in ("llama", "gpt2"):
        people_tofu.save_zoo_folder(str(root / arch), rows, arch, seed=0)
    return root, paths


def _forget(model_dir, paths, out, *extra):
    return ["forget", "--task", "lm", "--hf-model", str(model_dir), "--forget-data", paths["forget10"],
            "--retain-data", paths["retain90"], "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_round_trip_from_a_folder_and_tofu_files_to_a_folder_verify_accepts(hf, tmp_path, capsys, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, paths = hf
    src = root / arch
    before = {p: open(p, "rb").read() for p in map(str, src.iterdir())}
    out = tmp_path / "out" / "forgot"
    assert cli.main(_forget(src, paths, out)) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["forgot", "forgot.record.json"]
    assert {p: open(p, "rb").read() for p in map(str, src.iterdir())} == before  # the input is untouched
    # from_pretrained loads it as the same class, with its tokenizer
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    original = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True)
    assert type(loaded) is type(original)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(str(src), local_files_only=True).get_vocab()
    changed = [k for k, v in original.state_dict().items() if not torch.equal(v, loaded.state_dict()[k])]
    assert changed, "the unlearning changed no weight"
    # the record's hashes are over the saved tensors of both folders; verify accepts the folder
    rec = read_record(str(tmp_path / "out" / "forgot.record.json"))
    assert rec["output"]["weights_sha256"] == state_dict_sha256(loaded) == state_dict_sha256(
        safetensors_state_dict(str(out)))
    assert rec["input"]["weights_sha256"] == state_dict_sha256(original)
    assert rec["forgotten"]["samples"] == len(json.loads(open(paths["forget10"]).read()))
    assert rec["model"]["class"] == type(original).__name__ and rec["model"]["dtype"] == "fp32"
    capsys.readouterr()
    assert cli.main(["verify", "--record", str(tmp_path / "out" / "forgot.record.json"), "--weights", str(out)]) == 0
    assert capsys.readouterr().out.startswith("OK")
    # a changed tensor in the folder is a mismatch (exit 1)
    from safetensors.torch import save_file
    state = safetensors_state_dict(str(out))
    key = sorted(state)[0]
    state[key] = state[key] + 1
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(["verify", "--record", str(tmp_path / "out" / "forgot.record.json"), "--weights", str(out)]) == 1


def test_one_data_file_with_forget_indices_bf16_and_a_relearning_step(hf, tmp_path):
    root, paths = hf
    (tmp_path / "idx.txt").write_text("0 1 2 3\n")
    out = tmp_path / "o"
    assert cli.main(["forget", "--task", "lm", "--hf-model", str(root / "llama"), "--data", paths["full"],
                     "--forget-indices", str(tmp_path / "idx.txt"), "--dtype", "bf16", "--relearn-step", "1e-3",
                     "--out", str(out), "--quiet"]) == 0
    state = safetensors_state_dict(str(out))
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    rec = read_record(str(tmp_path / "o.record.json"))
    assert rec["forgotten"]["samples"] == 4 and rec["model"]["dtype"] == "bf16"
    assert json.dumps(rec).count('"relearn_step": 0.001') == 1   # (the forget side one relearning step away)
    assert rec["output"]["weights_sha256"] == state_dict_sha256(state)


def _copy_model(src, dst, keep_tokenizer=True):
    shutil.copytree(src, dst)
    if not keep_tokenizer:
        for name in folders.TOKENIZER_FILES:
            if (dst / name).exists():
                (dst / name).unlink()


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _classifier_folder(folder, tokenizer_from):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    LlamaForSequenceClassification(cfg).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("no_tokenizer", "has no tokenizer"),
    ("classifier", "holds a LlamaForSequenceClassification, not a causal language model"),
    ("wrong_shape", "the weights do not fit config.json (tensors of the wrong shape)"),
    ("missing_layer", "the weights do not fit config.json (9 missing: model.layers.2."),
    ("no_config", "has no config.json"),
    ("out_exists", "already exists"),
    ("out_in_input", "would overwrite the input"),
    ("no_data", "give --forget-data and --retain-data, or --data with --forget-indices"),
    ("retrain", "--retrain does not go with --task lm --hf-model"),
    ("both_data", "give either --forget-data and --retain-data, or --data with --forget-indices, not both"),
])
def test_each_bad_folder_is_a_one_line_error_and_writes_nothing(hf, tmp_path, capsys, case, match):
    root, paths = hf
    src = tmp_path / "model"
    out = tmp_path / "out"
    argv = _forget(src, paths, out)
    if case == "missing":
        pass
    elif case == "no_tokenizer":
        _copy_model(root / "llama", src, keep_tokenizer=False)
    elif case == "classifier":
        _classifier_folder(src, root / "llama")
    elif case == "wrong_shape":
        _copy_model(root / "llama", src)
        _edit_config(src, intermediate_size=48)
    elif case == "missing_layer":
        _copy_model(root / "llama", src)
        _edit_config(src, num_hidden_layers=3)
    elif case == "no_config":
        _copy_model(root / "llama", src)
        (src / "config.json").unlink()
    elif case == "out_exists":
        _copy_model(root / "llama", src)
        out.mkdir()
        (out / "x").write_text("x")
    elif case == "out_in_input":
        _copy_model(root / "llama", src)
        argv = _forget(src, paths, src / "sub")
    elif case == "no_data":
        _copy_model(root / "llama", src)
        argv = argv[:5] + argv[9:]  # no --forget-data / --retain-data
    elif case == "retrain":
        _copy_model(root / "llama", src)
        argv = argv + ["--retrain"]
    elif case == "both_data":
        _copy_model(root / "llama", src)
        argv = argv + ["--data", paths["full"]]
    assert_one_line_error(capsys, argv, tmp_path, match)


def test_an_encoder_loaded_as_a_causal_lm_head_is_refused_by_behaviour(tmp_path):
    """A BertLMHeadModel without is_decoder: its config names a causal-LM class, but it attends ahead."""
    from transformers import BertConfig, BertLMHeadModel

    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertLMHeadModel(cfg).save_pretrained(str(tmp_path / "bert"))
    people_tofu.people_tokenizer([{"text": "a b c"}]).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(folders.FolderError, match="earlier positions' logits depend on a later token"):
        folders.read_causal_lm(str(tmp_path / "bert"))
    from transformers import BertForMaskedLM

    with pytest.raises(folders.FolderError, match="not a causal language model"):
        folders.check_causal(BertForMaskedLM(cfg).eval(), 30)
    # the same check passes a causal model built from the same family with is_decoder on
    model = BertLMHeadModel(BertConfig(**{**cfg.to_dict(), "is_decoder": True})).eval()
    folders.check_causal(model, 30)


def test_a_failing_run_leaves_no_output_folder_and_no_record(hf, tmp_path, monkeypatch):
    root, paths = hf
    calls = []

    def fail_after_writing(path):
        calls.append(sorted(os.listdir(path)))  # the folder was written in full into the temp sibling...
        raise RuntimeError("disk gone")           # ...and the run dies before publishing it

    monkeypatch.setattr(folders, "folder_sha256", fail_after_writing)
    with pytest.raises(RuntimeError, match="disk gone"):
        cli.main(_forget(root / "llama", paths, tmp_path / "out" / "forgot"))
    assert calls and "model.safetensors" in calls[0] and "tokenizer.json" in calls[0]
    assert files_under(tmp_path) == []  # no folder, no record, no temp, not even the created parent


def test_write_folder_is_atomic_and_never_overwrites(hf, tmp_path, monkeypatch):
    root, _ = hf
    model, tok = folders.read_causal_lm(str(root / "gpt2"))
    sha = folders.write_folder(model, tok, str(tmp_path / "a"), inputs=[str(root / "gpt2")])
    assert sha == folders.folder_sha256(str(root / "gpt2")) == state_dict_sha256(model)
    with pytest.raises(folders.FolderError, match="already exists"):
        folders.write_folder(model, tok, str(tmp_path / "a"))
    with pytest.raises(folders.FolderError, match="would overwrite the input"):
        folders.write_folder(model, tok, str(root / "gpt2"), inputs=[str(root / "gpt2")])
    monkeypatch.setattr(tok, "save_pretrained", lambda path: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        folders.write_folder(model, tok, str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_a_classifier_folder_goes_in_with_hf_model_and_comes_out_a_folder(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from _user_models import NUM_CLASSES, text_data

    train, test, vocab = text_data()

    def to_hf(ds):
        return datasets.Dataset.from_dict({"input_ids": ds.columns["input_ids"][:160].tolist(),
                                           "attention_mask": ds.columns["attention_mask"][:160].tolist(),
                                           "label": ds.targets[:160].tolist()})

    datasets.DatasetDict({"train": to_hf(train), "test": to_hf(test)}).save_to_disk(str(tmp_path / "data"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=NUM_CLASSES,
        architectures=["BertForSequenceClassification"])).save_pretrained(str(tmp_path / "bert"))
    out = tmp_path / "out" / "forgot"
    assert cli.main(["forget", "--hf-model", str(tmp_path / "bert"), "--data", str(tmp_path / "data"),
                     "--classes", "1", "--out", str(out), "--quiet"]) == 0
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True)
    assert float(loaded.classifier.weight[1].detach().abs().sum()) == 0.0  # the forgotten class's row is pruned
    rec = read_record(str(tmp_path / "out" / "forgot.record.json"))
    assert rec["output"]["weights_sha256"] == folders.folder_sha256(str(out))
    assert cli.main(["verify", "--record", str(tmp_path / "out" / "forgot.record.json"), "--weights", str(out)]) == 0
    assert_one_line_error(capsys, ["forget", "--hf-model", str(tmp_path / "bert"), "--weights", "w.pt", "--data",
                                   str(tmp_path / "data"), "--out", str(tmp_path / "o2")], tmp_path, "not both")


@pytest.mark.slow
def test_the_command_line_round_trip_in_a_subprocess(tmp_path):
    """`python -m dfmu_ext.zoo.people_tofu` writes the files and a GPT-2 folder; `dfmu forget` and
    `dfmu verify` run on them as a user would."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}

    def run(*args):
        res = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        return res

    run("dfmu_ext.zoo.people_tofu", "bench", "--arch", "gpt2", "--people", "10")
    run("dfmu_ext", "forget", "--task", "lm", "--hf-model", "bench/model", "--forget-data", "bench/data/forget05.json",
        "--retain-data", "bench/data/retain95.json", "--out", "out/forgot", "--quiet")
    assert "OK" in run("dfmu_ext", "verify", "--record", "out/forgot.record.json", "--weights", "out/forgot").stdout


def test_nonmember_data_reads_tofus_holdout_rows_and_the_record_holds_the_auc(hf, tmp_path, capsys):
    root, paths = hf
    out = tmp_path / "o"
    assert cli.main(_forget(root / "llama", paths, out, "--nonmember-data", paths["holdout10"])) == 0
    rec = read_record(str(tmp_path / "o.record.json"))
    side = rec["forget_side"]
    assert side["stop"] == "estimate" and 0.0 <= side["auc_before"] <= 1.0 and 0.0 <= side["auc"] <= 1.0
    assert side["auc_threshold"] == 0.55 and rec["data"]["nonmember_data"] == os.path.abspath(paths["holdout10"])
    if side["auc"] > 0.55 and side["ended"] != "guard":   # never silently
        assert "warning: ForgettingWarning: DFMU: a loss attack still tells" in capsys.readouterr().err
    # a missing file is a one-line error and nothing is written; so is the flag on a classifier
    missing = str(tmp_path / "none.json")
    assert_one_line_error(capsys, _forget(root / "llama", paths, tmp_path / "p", "--nonmember-data", missing),
                          tmp_path, "--nonmember-data: data")
    assert not os.path.exists(tmp_path / "p") and not os.path.exists(tmp_path / "p.record.json")
    assert_one_line_error(capsys, ["forget", "--ckpt", "c.pt", "--out", str(tmp_path / "q.pt"), "--nonmember-data",
                                   "x.json"], tmp_path, "--nonmember-data goes with --task lm --hf-model")

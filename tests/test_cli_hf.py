"""`dfmu forget` on a transformers model built from a config (--hf-config) and a saved Hugging Face
`datasets` folder (--data DIR, read with load_from_disk): the path a new user with a BERT-style text
classifier takes from the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")
pytest.importorskip("datasets", reason="datasets is not installed (pip install .[hf])")

from _user_models import NUM_CLASSES, text_data, train_config  # noqa: E402

pytestmark = pytest.mark.slow  # every test runs the CLI in a subprocess (23 s for the file, measured)


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "dfmu_ext", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    import datasets
    from transformers import BertConfig, BertForSequenceClassification

    from dfmu_ext.training import train_model

    root = tmp_path_factory.mktemp("hf")
    train, test, vocab = text_data()

    def to_hf(ds):
        return datasets.Dataset.from_dict({
            "input_ids": ds.columns["input_ids"].tolist(), "attention_mask": ds.columns["attention_mask"].tolist(),
            "label": ds.targets.tolist()},
            features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                        "attention_mask": datasets.Sequence(datasets.Value("int64")),
                                        "label": datasets.ClassLabel(names=[f"t{c}" for c in range(NUM_CLASSES)])}))

    datasets.DatasetDict({"train": to_hf(train), "test": to_hf(test)}).save_to_disk(str(root / "data"))
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=NUM_CLASSES,
                        architectures=["BertForSequenceClassification"])
    config.save_pretrained(str(root / "config"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    train_model(model, train, train_config("hf-bert"))
    torch.save(model.state_dict(), root / "weights.pt")
    return root


def test_forget_a_class_of_a_bert_from_config_on_a_saved_datasets_folder(hf_files):
    out = hf_files / "out" / "forgot.pt"
    before = sorted(os.listdir(hf_files))
    res = _cli("forget", "--hf-config", str(hf_files / "config"), "--weights", str(hf_files / "weights.pt"),
               "--data", str(hf_files / "data"), "--classes", "1", "--out", str(out), "--quiet", cwd=hf_files)
    assert res.returncode == 0, res.stderr
    report = json.loads((hf_files / "out" / "forgot-report" / "report.json").read_text())
    text = json.dumps(report)
    assert "forget" in text
    state = torch.load(out, weights_only=True)
    assert "classifier.weight" in state and float(state["classifier.weight"][1].abs().sum()) == 0.0
    record = json.loads((hf_files / "out" / "forgot.record.json").read_text())
    assert record["model"]["arch"].endswith(":hf_from_config")
    assert sorted(set(os.listdir(hf_files)) - {"out"}) == before  # the inputs are untouched


def test_hf_config_errors_are_one_line(hf_files, tmp_path):
    res = _cli("forget", "--hf-config", str(tmp_path / "missing"), "--weights", str(hf_files / "weights.pt"),
               "--data", str(hf_files / "data"), "--out", str(tmp_path / "o.pt"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and "does not exist" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)
    res = _cli("forget", "--hf-config", str(hf_files / "config"), "--arch", "torch.nn:Linear",
               "--weights", str(hf_files / "weights.pt"), "--data", str(hf_files / "data"),
               "--out", str(tmp_path / "o.pt"), cwd=tmp_path)
    assert res.returncode == 2 and "not both" in res.stderr and not os.listdir(tmp_path)

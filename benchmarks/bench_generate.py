"""Decode benchmark of a KV-cache causal LM: prefill P tokens, then decode D tokens one at a time
(greedy, no stop at end-of-sequence), median tokens/s over repeats, at each thread count.

Engines: our artifacts (any scheme: fp32, int8, fq2, ...) through fq_tvm's generate loop, and ONNX
Runtime fp32 / dynamic int8 (quantize_dynamic: QInt8 MatMul weights, per tensor) on the same KV-cache ONNX
graph with the same loop written over numpy. Each (engine, threads) runs in its own process, since
TVM's thread pool size is fixed when it starts. The prompt is the start of Pride and Prejudice
(if the Austen data is installed, else a fixed English text), tokenized with the artifact's tokenizer.
--rounds R runs the whole set of engines R times in turn and reports medians over all runs, so that a
slow spell of a shared machine falls on every engine rather than on one.
--ppl-windows N adds each engine's perplexity on N windows of 512 tokens of the same book.

  python benchmarks/bench_generate.py --onnx smol/smollm2_kv.onnx \\
      --artifact fp32=smol.fp32 --artifact fq2=smol.fq2 --ort fp32 --ort int8 --threads 1 2

Optional peer: llama.cpp through llama-cpp-python (`pip install llama-cpp-python`; it builds
llama.cpp from source, 10-15 minutes on 2 cores; not a dependency of fq-tvm). --llama-cpp NAME=GGUF
times a GGUF file with the same prompt token ids (our tokenizer), the same prefill (one eval of P
tokens) and the same decode loop (D one-token evals, greedy argmax over the last logits in numpy),
in its own process with n_threads = n_threads_batch = the thread count; its perplexity uses
logits_all=True on the same windows. Q4_0 / F16 files from the packaged Q4_1 one:

  llama_cpp.llama_model_quantize(b"in.gguf", b"out.gguf", ctypes.byref(params)) with
  params = llama_cpp.llama_model_quantize_default_params(), params.ftype =
  llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0 (or _F16) and params.allow_requantize = True
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def prompt_ids(tokenizer_json: Path, n: int) -> np.ndarray:
    from tokenizers import Tokenizer

    try:
        from fq_tvm.realmodels import austen_text

        text = austen_text("prideprejudice")
    except Exception:  # no Austen data here: a fixed text, repeated
        from fq_tvm.realmodels import CHECK_TEXTS

        text = " ".join(CHECK_TEXTS) * 40
    ids = Tokenizer.from_file(str(tokenizer_json)).encode(text).ids
    if len(ids) < n:
        raise SystemExit(f"the prompt text has {len(ids)} tokens, fewer than {n}")
    return np.asarray(ids[:n], dtype=np.int64)


def ours(artifact: Path):
    import fq_tvm

    model = fq_tvm.load(artifact)

    def run(prefill_ids, steps):
        out = model.generate(prefill_ids, max_new_tokens=steps + 1, stop_at_eos=False)
        return out.prefill_seconds, out.decode_seconds

    return run


def ort(onnx_path: Path, threads: int):
    import onnxruntime

    from fq_tvm.kvcache import empty_past, kv_names, read_generation

    import onnx

    info = read_generation(onnx.load(str(onnx_path), load_external_data=False))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    past_names, _ = kv_names(info["layers"])

    def step(ids, start, cache):
        out = session.run(None, {"input_ids": ids[None], "position_ids": np.arange(start, start + len(ids))[None],
                                 **cache})
        return out[0][0, -1], dict(zip(past_names, out[1:]))

    def run(prefill_ids, steps):
        t = time.perf_counter()
        logits, cache = step(prefill_ids, 0, empty_past(info))
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(steps):
            token = np.asarray([int(np.argmax(logits))], np.int64)
            logits, cache = step(token, len(prefill_ids) + i, cache)
        return prefill, time.perf_counter() - t

    return run


def ort_int8(onnx_path: Path) -> Path:
    """The graph with dynamic int8 MatMul weights, one scale per tensor (cached beside it). With
    per_channel=True, ORT 1.32's quantize_dynamic gave SmolLM2's KV graph a perplexity of 3e6
    (2.8e6 with MatMul alone), per tensor 29.9 against fp32's 19.3 (2 Austen windows)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = onnx_path.with_name(onnx_path.stem + ".ort_int8_per_tensor.onnx")
    if not path.is_file():
        quantize_dynamic(str(onnx_path), str(path), weight_type=QuantType.QInt8, per_channel=False,
                         op_types_to_quantize=["MatMul"])
    return path


def llama_cpp_engine(gguf: Path, threads: int, n_ctx: int, logits_all: bool = False):
    """A llama-cpp-python Llama on the GGUF file (the optional peer)."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                 logits_all=logits_all, verbose=False)


def llama_cpp(gguf: Path, threads: int, n_ctx: int):
    import llama_cpp as lc

    llm = llama_cpp_engine(gguf, threads, n_ctx)
    vocab = llm.n_vocab()
    ctx = llm._ctx.ctx

    def last_logits():  # only the last token of each eval has logits (logits_all=False): row 0
        return np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(vocab,))

    def run(prefill_ids, steps):
        llm.reset()  # n_tokens = 0: the next eval drops the whole KV cache
        t = time.perf_counter()
        llm.eval([int(i) for i in prefill_ids])
        logits = last_logits()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            llm.eval([int(np.argmax(logits))])
            logits = last_logits()
        return prefill, time.perf_counter() - t

    return run


def perplexity(kind: str, path: Path, onnx_path: Path, tokenizer_json: Path, windows: int, threads: int) -> float:
    """Perplexity on the first `windows` x 512 tokens of Pride and Prejudice (fq-eval's windows),
    each window one prefill with an empty cache."""
    import onnx
    from tokenizers import Tokenizer

    from fq_tvm.evaluate import austen_windows, ort_runner, perplexity as ppl
    from fq_tvm.kvcache import empty_past, read_generation

    info = read_generation(onnx.load(str(onnx_path), load_external_data=False))
    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = austen_windows(lambda text: {"input_ids": tok.encode(text).ids}, windows, 512)
    if kind == "llama":
        llm = llama_cpp_engine(path, threads, ids.shape[1], logits_all=True)

        def run_llama(feed):
            llm.reset()
            llm.eval([int(i) for i in feed["input_ids"][0]])
            return {"logits": np.array(llm.scores[: feed["input_ids"].shape[1]])[None]}

        return ppl(run_llama, ids)
    if kind == "ours":
        import fq_tvm

        inner = fq_tvm.load(path).run
    else:
        inner = ort_runner(path, threads)

    def run(feed):
        n = feed["input_ids"].shape[1]
        return inner({**feed, "position_ids": np.arange(n, dtype=np.int64)[None], **empty_past(info)})

    return ppl(run, ids)


def measure(kind: str, path: Path, onnx_path: Path, threads: int, prefill: int, decode: int, repeat: int,
            ppl_windows: int = 0) -> dict:
    tokenizer = onnx_path.parent / "tokenizer.json"  # fq-export's, which the artifacts carry compressed
    result = {}
    if ppl_windows:
        result["perplexity"] = round(perplexity(kind, path, onnx_path, tokenizer, ppl_windows, threads), 3)
    if repeat < 1:
        return result
    ids = prompt_ids(tokenizer, prefill)
    if kind == "llama":
        run = llama_cpp(path, threads, max(512, prefill + decode + 16))
    else:
        run = ours(path) if kind == "ours" else ort(path, threads)
    run(ids[:16], 4)  # warm-up
    prefills, decodes = [], []
    for _ in range(repeat):
        p, d = run(ids, decode)
        prefills.append(prefill / p)
        decodes.append(decode / d)
    return {**result, "prefill_tokens_per_s": round(statistics.median(prefills), 2),
            "decode_tokens_per_s": round(statistics.median(decodes), 2),
            "prefill_runs": [round(x, 2) for x in prefills], "decode_runs": [round(x, 2) for x in decodes]}


def child(args) -> None:
    kind, path, threads = args.one
    print(json.dumps(measure(kind, Path(path), Path(args.onnx), int(threads), args.prefill, args.decode,
                             args.repeat, args.ppl_windows)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", required=True, help="the KV-cache ONNX graph (fq-export ... --kv-cache)")
    p.add_argument("--artifact", action="append", default=[], metavar="NAME=DIR", help="our artifact (repeatable)")
    p.add_argument("--ort", action="append", default=[], choices=("fp32", "int8"), help="ONNX Runtime on the graph")
    p.add_argument("--llama-cpp", nargs="+", default=[], metavar="[NAME=]GGUF",
                   help="llama.cpp (optional peer: pip install llama-cpp-python) on these GGUF files")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per engine and thread count (0: no timing)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every engine this many times in turn (fresh processes), medians over all runs")
    p.add_argument("--ppl-windows", type=int, default=0, metavar="N",
                   help="also the perplexity on N x 512 tokens of Pride and Prejudice (at the first thread count)")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        child(args)
        return 0
    onnx_path = Path(args.onnx)
    engines = [(f"ours {name}", "ours", Path(d)) for name, _, d in (a.partition("=") for a in args.artifact)]
    engines += [(f"ORT {kind}", "ort", onnx_path if kind == "fp32" else ort_int8(onnx_path)) for kind in args.ort]
    for spec in args.llama_cpp:
        name, _, gguf = spec.rpartition("=")
        engines.append((f"llama.cpp {name or Path(gguf).stem}", "llama", Path(gguf)))
    rows = {}  # (engine, threads) -> its row, runs gathered over the rounds
    for rnd in range(args.rounds):  # rounds interleave the engines, so a slow spell of the machine hits them all
        for label, kind, path in engines:
            for threads in args.threads:
                ppl = args.ppl_windows if threads == args.threads[0] and rnd == 0 else 0
                env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
                cmd = [sys.executable, __file__, "--onnx", str(onnx_path), "--prefill", str(args.prefill), "--decode",
                       str(args.decode), "--repeat", str(args.repeat), "--one", kind, str(path), str(threads),
                       "--ppl-windows", str(ppl)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{label} x{threads}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                got = json.loads(done.stdout.strip().splitlines()[-1])
                row = rows.setdefault((label, threads), {"engine": label, "threads": threads, "prefill_runs": [],
                                                         "decode_runs": []})
                row.update({k: v for k, v in got.items() if k == "perplexity"})
                row["prefill_runs"] += got.get("prefill_runs", [])
                row["decode_runs"] += got.get("decode_runs", [])
                if row["decode_runs"]:
                    row["prefill_tokens_per_s"] = round(statistics.median(row["prefill_runs"]), 2)
                    row["decode_tokens_per_s"] = round(statistics.median(row["decode_runs"]), 2)
                speed = (f"prefill {row['prefill_tokens_per_s']:8.1f} tokens/s, decode "
                         f"{row['decode_tokens_per_s']:7.1f} tokens/s" if "decode_tokens_per_s" in row else "")
                perp = f" perplexity {row['perplexity']:.3f}" if "perplexity" in row else ""
                tag = f" (medians of {len(row['decode_runs'])} runs, round {rnd + 1})" if args.rounds > 1 else ""
                print(f"{label:18} {threads} thread(s): {speed}{perp}{tag}", flush=True)
    results = list(rows.values())
    if args.json:
        Path(args.json).write_text(json.dumps({"prefill": args.prefill, "decode": args.decode, "repeat": args.repeat,
                                               "rounds": args.rounds, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

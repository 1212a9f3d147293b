"""`fq-generate`: generate text with a causal LM artifact that has a KV cache (fq_tvm/generate.py)."""

from __future__ import annotations

import argparse
import json
import sys

from .cli import Parser, _cli
from .errors import FqError

EPILOG = """\
examples:
  fq-export smollm2 --kv-cache -o smol && fq-compile smol/smollm2_kv.onnx -o smol.fp32
  fq-generate smol.fp32 --prompt "The capital of France is" --max-new-tokens 32
  fq-generate smol.fp32 --prompt "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1

The text streams to stdout as it is generated; prefill and decode tokens/s go to stderr.
exit status: 0 success; 1 any error (one line on stderr); 130 interrupted.
"""


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="fq-generate", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
               description="Generate text with a compiled causal LM (exported with --kv-cache).")
    p.add_argument("artifact", help="artifact directory written by fq-compile")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="at most N new tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampler (repeatable sampling)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer.json or its directory (default: the artifact's)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at an end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of streaming")
    return p


@_cli("fq-generate")
def main(argv=None):
    args = _parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise FqError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    from .artifact import load
    from .generate import generate, spec

    model = load(args.artifact)
    spec(model)  # not a causal LM: say so before reading the tokenizer
    stream = None if args.json else _write
    out = generate(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, tokenizer=args.tokenizer, stream=stream,
                   stop_at_eos=not args.no_stop)
    if args.json:
        print(json.dumps({"text": out.text, "tokens": out.tokens, "finish": out.finish,
                          "prompt_tokens": out.prompt_tokens, "prefill_tokens_per_s": round(out.prefill_tokens_per_s, 2),
                          "decode_tokens_per_s": round(out.decode_tokens_per_s, 2)}, indent=2))
    else:
        print(flush=True)
        print(out.summary(), file=sys.stderr)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())

"""Command-line entry points: fq-compile, fq-run, fq-demo. Errors, bad arguments included, are one
line on stderr and exit status 1; an interrupt exits 130 (SIGTERM 143)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
import warnings

from .errors import FqError, FqWarning, warn

EPILOG_COMPILE = """\
examples:
  fq-compile model.onnx --target host -o model.host          # build and run here
  fq-compile model.onnx --target rpi5 -o model.rpi5          # cross-compile for a Raspberry Pi 5
  fq-compile model.onnx --target cuda --cuda-arch sm_86 -o model.cuda
  fq-compile model.onnx --target '{"kind": "llvm", "mcpu": "znver4"}' -o model.zen4
  fq-compile model.onnx --scheme fq2 --redundancy 1.1 --calib calib.npz --skip lm_head -o model.fq2
  fq-compile smollm2.onnx --scheme fq2 --calib calib.npz --quantize-head -o smollm2.fq2
  fq-compile smollm2_kv.onnx --scheme fq2 --calib calib.npz --head-scheme int8 -o smollm2.fq2
  fq-compile --list-targets

The output is a directory: model.so (+ device code for CUDA) and manifest.json with versions,
target, scheme, input/output signature and sha256 checksums. It is written to a temporary
directory and renamed when complete, so a failed compile leaves nothing behind.
Run it with: fq-run OUT_DIR --input inputs.npz

--force replaces OUTPUT only when it is an fq-tvm artifact (it has our manifest.json); it never
replaces the model, a directory holding it, the current directory or any other file.
Progress and the final summary go to stderr, the artifact path to stdout (--json: the summary as
JSON on stdout); -q prints errors only.
""" + "{exit}"

EPILOG_RUN = """\
The .npz keys are the model's input names (see the artifact's manifest.json). Without --output
the outputs' names, shapes and a few statistics are printed.
example:
  python -c "import numpy as np; np.savez('in.npz', x=np.random.rand(2, 8, 64).astype('float32'))"
  fq-run model.host --input in.npz --output out.npz
""" + "{exit}"
EXIT_STATUS = """
exit status: 0 success; 1 any error, bad arguments included (one line on stderr, no traceback;
FQ_DEBUG=1 adds the traceback of an internal error); 130 interrupted (Ctrl-C); 143 terminated.
"""
EPILOG_COMPILE = EPILOG_COMPILE.replace("{exit}", EXIT_STATUS)
EPILOG_RUN = EPILOG_RUN.replace("{exit}", EXIT_STATUS)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are FqErrors: one line and exit status 1, like every other error."""

    def error(self, message):
        raise FqError(f"{message} (see {self.prog} --help)")


def _cli(prog: str):
    """Wrap a main(argv) so FqError (and surprises) print one line instead of a traceback."""

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            debug = os.environ.get("FQ_DEBUG") == "1"
            try:
                return main(argv) or 0
            except FqError as err:
                print(f"{prog}: error: {err}", file=sys.stderr)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            except Exception as err:  # an fq-tvm bug, not bad input
                if debug:
                    traceback.print_exc()
                print(f"{prog}: internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                      f" (set FQ_DEBUG=1 for a traceback)", file=sys.stderr)
            return 1

        return run

    return wrap


def _compile_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="fq-compile", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_COMPILE,
        description="Compile an ONNX model with TVM into a deployable artifact for a CPU or GPU target.")
    p.add_argument("model", nargs="?", help="the .onnx file to compile")
    p.add_argument("-t", "--target", default="host",
                   help="target preset name (see --list-targets) or a TVM target JSON dict (default: host)")
    p.add_argument("-o", "--output", help="artifact directory to write (default: MODEL.TARGET.SCHEME beside the model)")
    p.add_argument("--scheme", default="fp32",
                   help="weight scheme: fp32 (default), int8, int7 (faster than int8 on AVX2 without VNNI), rtn2, "
                        "gptq2, had2 (Hadamard only), fq2 (FrameQuant 2-bit, r=1.1), fq2r1, fq4 ... "
                        "(see --list-schemes)")
    p.add_argument("--redundancy", type=float, help="frame redundancy r for fq schemes (1.0 = no frame; "
                                                        "1.1 with l=8 gives k/l = 9/8: 2.25 bits per 2-bit code)")
    p.add_argument("--l-den", type=int, help="frame block size parameter l (a block maps 2l inputs to 2k, "
                                                 "k = round(l r); default 8)")
    p.add_argument("--seed", type=int, metavar="S",
                   help="rotation seed of FrameQuant schemes (the randomized Hadamard's signs; default 0). "
                        "2-bit quality moves with it (MiniLM cosine +-0.002, SmolLM2 perplexity a few "
                        "percent): compare schemes over a few seeds, not single builds")
    p.add_argument("--calib", help=".npz of sample inputs keyed by input name, samples along axis 0 "
                                   "(needed by gptq/had/fq schemes)")
    p.add_argument("--calib-samples", type=int, metavar="N", help="calibrate on the first N samples of --calib")
    p.add_argument("--calib-text", metavar="FILE", help="token-id models: calibrate on this plain text file (one "
                                                        "sample per paragraph) tokenized with --tokenizer")
    p.add_argument("--bits", type=float, metavar="B",
                   help="FrameQuant schemes: per group of layers reading one activation, choose the frame redundancy "
                        "(1.0, the scheme's, 1.25, 1.5) or 4-bit codes with the least held-out error, within B "
                        "stored bits per weight on average (e.g. 2.4); quantizes every layer once per option")
    p.add_argument("--calib-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate each layer on the model with the layers before it already quantized (GPTQ's "
                        "order; one pass over the samples, but no calibration reuse across schemes), or on the "
                        "fp32 model (--no-calib-sequential); default: the scheme's choice (--list-schemes)")
    p.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=None,
                   help="fit one least-squares gain per stored row of each layer (folded into its scales), kept where "
                        "it lowers the held-out error; default: the scheme's choice")
    p.add_argument("--fp-target", action=argparse.BooleanOptionalAction, default=None,
                   help="with sequential calibration, fit each layer to the fp32 model's outputs (the fp32 model "
                        "runs alongside: calibration costs twice the forward passes), and layers feeding a residual "
                        "Add also to the fp32 residual stream (the scheme's fp_residual); default: the scheme's choice")
    p.add_argument("--refine", type=int, metavar="N",
                   help="rounds of per-row grid refit and code coordinate descent after GPTQ (0: off); default: "
                        "the scheme's choice")
    p.add_argument("--tokenizer", metavar="DIR", help="directory with tokenizer.json (or the file) for --calib-text")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS",
                   help="pin a dynamic input before import, by input name (pixel_values=1,3,224,224) or by "
                        "symbolic dim name (batch=1); repeatable")
    p.add_argument("--skip", metavar="REGEX", help="keep layers whose name, node or weight matches REGEX in "
                                                   "fp32 (e.g. 'lm_head')")
    p.add_argument("--pad-small", action="store_true",
                   help="quantize layers whose sizes padding would make store over 1.5x the scheme's nominal bits "
                        "per weight (fq2 on 100 -> 37: 6.1 bits); by default they stay fp32, listed with the reason")
    p.add_argument("--quantize-head", action="store_true",
                   help="quantize the tied embedding / LM head too (SmolLM2's 49152x576 table): stored once at "
                        "the scheme's bits, the embedding gathers the same codes; an error for a model "
                        "without a tied head, ignored (with a warning) under fp32")
    p.add_argument("--head-scheme", metavar="SCHEME",
                   help="quantize the tied head with SCHEME instead of --scheme (implies --quantize-head): "
                        "int8 keeps SmolLM2's head near fp32 quality at a quarter of its bytes, which decoding "
                        "reads once per token, while the body stays at 2 bits (int7 on AVX2 without VNNI)")
    p.add_argument("--act-bits", type=int, choices=(8, 32), default=8,
                   help="activations of quantized layers: 8 (default) quantizes them per row and group of 256 "
                        "and multiplies in int8 (AVX-512 VNNI, AVX2, Arm dotprod, NEON); 32 keeps them float")
    p.add_argument("--cuda-arch", help="CUDA architecture for CUDA targets, e.g. sm_80 (default), sm_86, sm_90")
    p.add_argument("--tuning-db", metavar="DIR", help="apply the schedules fq-tune wrote to DIR for this target "
                                                      "(CPU graph ops; others keep the built-in schedules)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON on stdout")
    p.add_argument("--list-targets", action="store_true", help="print the target presets and exit")
    p.add_argument("--list-schemes", action="store_true", help="print the quantization schemes and exit")
    return p


def _list_targets() -> None:
    from .targets import presets

    for preset in presets():
        print(f"{preset.name:13} {preset.description}")
        print(f"{'':13} {json.dumps(preset.target)}")


def _list_schemes() -> None:
    from .numerics import SCHEMES, storage_bits

    for cfg in SCHEMES.values():
        stored = cfg.method != "none" and storage_bits(cfg.bits) != cfg.bits
        extra = f" (stored in {storage_bits(cfg.bits)} bits)" if stored else ""
        extra += f" r={cfg.redundancy}" if cfg.method == "framequant" else ""
        extra += " sequential calibration" if cfg.sequential else ""
        extra += " denoise" if cfg.denoise else ""
        extra += " fp32-target" if cfg.fp_target else ""
        extra += " +residual" if cfg.fp_target and cfg.fp_residual else ""
        extra += f" refine {cfg.refine}" if cfg.refine else ""
        print(f"{cfg.name:7} {cfg.method:10} {cfg.bits:2d}-bit{extra}")


@_cli("fq-compile")
def compile_main(argv=None):
    args = _compile_parser().parse_args(argv)
    if args.list_targets:
        _list_targets()
        return 0
    if args.list_schemes:
        _list_schemes()
        return 0
    if not args.model:
        raise FqError("no model given; usage: fq-compile MODEL.onnx --target TARGET -o OUT_DIR (see --help)")
    from .compiler import calibrates, ignored_options
    from .compiler import compile as compile_model
    from .quantize import scheme_config

    start = time.monotonic()
    with warnings.catch_warnings():
        if args.quiet:
            warnings.simplefilter("ignore", FqWarning)
        else:
            warnings.simplefilter("always", FqWarning)
            warnings.showwarning = _show_warning(warnings.showwarning)
        calib, samples, cfg = args.calib, args.calib_samples, scheme_config(args.scheme)
        if args.calib_text or args.tokenizer:
            _check_text_calibration(args)
        given = {"--calib": args.calib, "--calib-text": args.calib_text, "--calib-samples": args.calib_samples,
                 "--calib-sequential": args.calib_sequential or None, "--denoise": args.denoise or None,
                 "--fp-target": args.fp_target or None, "--refine": args.refine or None,
                 "--pad-small": args.pad_small, "--quantize-head": args.quantize_head,
                 "--head-scheme": args.head_scheme}
        for text in ignored_options(cfg, given):
            warn(text)
        if not calibrates(cfg):
            calib = samples = None
        elif args.calib_text:
            calib = _text_calibration(args)
        out = compile_model(args.model, args.target, args.output, scheme=args.scheme, redundancy=args.redundancy,
                            l_den=args.l_den, calib=calib, skip=args.skip, cuda_arch=args.cuda_arch,
                            force=args.force, quiet=args.quiet, act_bits=args.act_bits,
                            input_shapes=args.input_shape, calib_samples=samples,
                            pad_small=args.pad_small and cfg.method != "none",
                            tuning_db=args.tuning_db, quantize_head=args.quantize_head and cfg.method != "none",
                            head_scheme=args.head_scheme if cfg.method != "none" else None,
                            calib_sequential=args.calib_sequential if calibrates(cfg) else None,
                            denoise=args.denoise if calibrates(cfg) else None, bits=args.bits,
                            fp_target=args.fp_target if calibrates(cfg) else None,
                            refine=args.refine if calibrates(cfg) else None, seed=args.seed)
    info = summary(out, time.monotonic() - start)
    if args.json:
        print(json.dumps(info, indent=2))
    elif not args.quiet:
        print(summary_text(info), file=sys.stderr)
        print(out)
    return 0


def _show_warning(show):
    """warnings.showwarning printing an FqWarning as one line, `fq-compile: warning: ...`."""

    def shown(message, category, *rest, **kw):
        if issubclass(category, FqWarning):
            print(f"fq-compile: warning: {message}", file=sys.stderr, flush=True)
        else:
            show(message, category, *rest, **kw)

    return shown


def _check_text_calibration(args) -> None:
    if not (args.calib_text and args.tokenizer):
        raise FqError("--calib-text and --tokenizer go together")
    if args.calib:
        raise FqError("give --calib or --calib-text, not both")


def _text_calibration(args) -> dict:
    from .calib_data import from_text

    if not os.path.isfile(args.model):
        raise FqError(f"{args.model}: no such file")
    return from_text(args.model, args.calib_text, args.tokenizer, args.calib_samples)


def _run_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="fq-run", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_RUN,
        description="Run a compiled fq-tvm artifact on this machine.")
    p.add_argument("artifact", help="artifact directory written by fq-compile")
    p.add_argument("-i", "--input", required=True, help=".npz file keyed by input name")
    p.add_argument("-o", "--output", help=".npz file to write the outputs to")
    p.add_argument("--repeat", type=int, metavar="N", help="also time N calls (after 3 warm-up calls) and print "
                                                           "median / p10 / p90 ms on stderr")
    return p


def write_npz(path: str, arrays: dict) -> str:
    """Write `arrays` to PATH (.npz added unless present, as numpy does) through a temporary
    file renamed into place; return the path written."""
    import numpy as np

    path = path if path.endswith(".npz") else path + ".npz"
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise FqError(f"{path}: cannot write ({err.strerror})") from None
    return path


@_cli("fq-run")
def run_main(argv=None):
    args = _run_parser().parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        raise FqError(f"--repeat must be at least 1, not {args.repeat}")
    from .artifact import load
    from .npz import read_npz

    model = load(args.artifact)
    inputs = read_npz(args.input)
    outputs = model.run(inputs)
    if args.repeat is not None:
        _print_timing(model, inputs, args.repeat)
    if args.output:
        print(write_npz(args.output, outputs))
    else:
        for name, value in outputs.items():
            print(f"{name}: shape {list(value.shape)} {value.dtype} mean {value.mean():.6g} "
                  f"std {value.std():.6g}")
    return 0


def _print_timing(model, inputs: dict, n: int) -> None:
    from .timing import repeat

    t = repeat(lambda: model.run(inputs), n)
    print(f"latency over {t['calls']} calls: median {t['median_ms']:.3f} ms, p10 {t['p10_ms']:.3f} ms, "
          f"p90 {t['p90_ms']:.3f} ms", file=sys.stderr)


def summary(out_dir, seconds: float) -> dict:
    """What the compile produced, from the manifest it just wrote."""
    from pathlib import Path

    from .artifact import MANIFEST

    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    weights = manifest["weights"]
    quantized = manifest["scheme"]["method"] != "none"
    fp32_bytes = weights.get("fp32_bytes", weights["bytes"])
    return {"artifact": str(out_dir), "scheme": manifest["scheme"]["name"], "target": manifest["target"]["name"],
            "layers_quantized": len(manifest.get("layers", [])),
            "layers_kept_fp32": len(manifest.get("skipped", [])) if quantized else None,
            "kept_fp32": [{key: entry[key] for key in ("name", "shape", "reason")}
                          for entry in manifest.get("skipped", [])] if quantized else None,
            "dense_bits_per_weight": weights.get("quantized_dense_bits_per_weight", 32.0),
            "body_bits_per_weight": _body_bits(manifest.get("layers", [])),
            "bits_per_weight": round(32 * weights["bytes"] / fp32_bytes, 4) if fp32_bytes else 32.0,
            "weight_bytes": weights["bytes"], "fp32_weight_bytes": fp32_bytes, "head": manifest.get("head"),
            "artifact_bytes": sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()),
            "compile_seconds": round(seconds, 2)}


def _body_bits(entries: list) -> float | None:
    """Bits per weight of the quantized layers other than a tied head; None without any."""
    body = [e for e in entries if not e.get("tied")]
    weights = sum(e["shape"][0] * e["shape"][1] for e in body)
    return round(8 * sum(e["bytes"] for e in body) / weights, 4) if weights else None


def summary_text(info: dict) -> str:
    mb = 1e6
    head = info.get("head") or {}
    if info["layers_kept_fp32"] is None:
        layers = f"no layers quantized (scheme {info['scheme']})"
    elif head.get("quantized") and head.get("scheme") != info["scheme"]:  # --head-scheme: the body alone here
        layers = (f"{_count(info['layers_quantized'] - 1, 'layer')} quantized ({info['scheme']}, "
                  f"{info['body_bits_per_weight'] or 0:.2f} bits per weight), {info['layers_kept_fp32']} kept fp32")
    else:
        layers = (f"{_count(info['layers_quantized'], 'layer')} quantized ({info['scheme']}, "
                  f"{info['dense_bits_per_weight']:.2f} bits per weight), {info['layers_kept_fp32']} kept fp32")
    ratio = info["fp32_weight_bytes"] / info["weight_bytes"] if info["weight_bytes"] else 1.0
    smaller = f"{ratio:.1f}x smaller" if ratio > 1.005 else "the same"
    layers += _head_text(info.get("head"), info["layers_kept_fp32"] is not None)
    return (f"compiled in {info['compile_seconds']:.1f} s: {layers}; weights {info['bits_per_weight']:.2f} bits "
            f"each on average, {info['weight_bytes'] / mb:.3f} MB against {info['fp32_weight_bytes'] / mb:.3f} MB "
            f"in fp32 ({smaller}); artifact {info['artifact_bytes'] / mb:.3f} MB on disk")


def _head_text(head: dict | None, quantized: bool) -> str:
    """', tied head ...' for a model with a tied embedding / LM head, else ''. quantized: the
    scheme quantizes (fp32 gets no hint to --quantize-head)."""
    if not head:
        return ""
    if head["quantized"]:
        return (f", tied head quantized ({head['scheme']}, {head['bits_per_weight']:.2f} bits per weight, "
                f"{head['bytes'] / 1e6:.3f} MB)")
    hint = "; --quantize-head quantizes it" if quantized else ""
    return f", tied head fp32 ({head['bytes'] / 1e6:.3f} MB{hint})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")

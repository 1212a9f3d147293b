"""The build driver behind `fq-compile`: ONNX -> Relax -> (rewrite) -> TVM build -> artifact."""

from __future__ import annotations

import math
import numbers
import sys
import time
from pathlib import Path

from . import __version__
from .artifact import build_time, check_output, staging_dir, write_manifest
from .errors import FqError, warn
from .gathers import add_ranges, fast_take_bounds, log_filter, without_log_lines
from .numerics.activations import ACT_BITS


class Steps:
    """One line per compile step on stderr with the seconds since the start, terminal or not
    (the long steps also draw their own tqdm bars)."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.quiet, self.start = total, 0, quiet, time.monotonic()

    def __call__(self, text: str) -> None:
        self.done += 1
        self.show(text)

    def show(self, text: str) -> None:
        if not self.quiet:
            print(f"[{self.done}/{self.total} {time.monotonic() - self.start:5.1f}s] {text}", file=sys.stderr,
                  flush=True)


def default_out_dir(model_path: Path, target_name: str, scheme: str) -> Path:
    return model_path.with_name(f"{model_path.stem}.{target_name}.{scheme}")


def compile(model, target="host", out_dir=None, *, scheme: str = "fp32", redundancy: float | None = None,
            l_den: int | None = None, calib=None, skip: str | None = None, cuda_arch: str | None = None,
            force: bool = False, quiet: bool = False, records: dict | None = None, act_bits: int = 8,
            input_shapes=None, calib_samples: int | None = None, pad_small: bool = False,
            tuning_db=None, quantize_head: bool = False, head_scheme: str | None = None,
            calib_sequential: bool | None = None, denoise: bool | None = None, bits: float | None = None,
            fp_target: bool | None = None, refine: int | None = None, seed: int | None = None) -> Path:
    """Compile an ONNX model for `target` into an artifact directory; return its path.

    model: path to an .onnx file. target: a preset name (`fq-compile --list-targets`) or a TVM
    target JSON dict string. scheme: fp32, int8, rtn2, gptq2, had2, fq2, fq4 ... (`--scheme`);
    redundancy / l_den override the frame of fq schemes, seed their rotation seed (the randomized
    Hadamard's signs; `--seed`, default the scheme's, 0). calib: .npz (or dict) of sample inputs
    keyed by input name, samples along axis 0 (needed by gptq/had/fq). skip: regex of layers to
    keep fp32. act_bits: 8 (default) quantizes each quantized layer's coded input to int8 per row
    and group and multiplies in int8 on CPUs with a dot-product ISA; 32 keeps float activations
    (`--act-bits`). input_shapes: {input or symbolic dim name: dims} or ["NAME=DIMS", ...] pins
    dynamic dims before import (`--input-shape`). calib_samples: use the first N calibration
    samples (`--calib-samples`); schemes that do not calibrate (fp32, int8, rtn*) ignore calib and
    calib_samples with an FqWarning. pad_small: quantize layers that padding makes store over 1.5x
    the scheme's nominal bits per weight (with an FqWarning each) instead of keeping them fp32
    (`--pad-small`). tuning_db: a directory written by fq-tune (`--tuning-db`): its
    tuned schedules replace the CPU fallback where they were faster. quantize_head: quantize the
    tied embedding / LM head too (`--quantize-head`), stored once at the scheme's bits without an
    output rotation, the embedding gathering the same codes (passes/tied_head.py); a model without
    a tied head is an FqError, fp32 ignores it with an FqWarning. head_scheme: quantize the head
    with this scheme instead of `scheme` (`--head-scheme`, e.g. int8 under fq2: the head that
    every decode step reads at 8 bits, the body at 2); implies quantize_head. calib_sequential: True
    calibrates each layer on the model with the layers before it already quantized (GPTQ's order,
    `--calib-sequential`), False on the fp32 model (`--no-calib-sequential`); None: the scheme's
    default (numerics QuantConfig.sequential). denoise: True fits one least-squares gain per stored
    row, kept where it lowers the held-out error (numerics/denoise.py, `--denoise`), False does not;
    None: the scheme's default. fp_target: with sequential calibration, fit each layer to the fp32
    model's outputs rather than to its own on the quantized inputs, and a layer feeding a residual
    Add to the fp32 residual stream too (numerics/sequential.py fp_target_weight; sets QuantConfig
    fp_target and fp_residual; `--fp-target`); None: the scheme's default. refine: rounds of per-row grid
    refit and code coordinate descent after GPTQ (numerics/refine.py, `--refine N`, 0 off); None:
    the scheme's default. bits: FrameQuant schemes only (`--bits`): per group
    of layers reading one activation, choose among numerics.allocation_options (redundancy 1.0, the
    scheme's, 1.25, 1.5; 4-bit codes) the least summed held-out error within `bits` stored bits per
    weight on average (quantize.quantize_allocated). records: if a dict, filled with {ONNX weight name: numerics.QuantizedLinear} of the
    layers the artifact runs quantized (to check it against a numpy evaluation). A failed compile
    leaves nothing at `out_dir`.
    """
    from . import onnx_io
    from .quantize import scheme_config
    from .targets import family, resolve

    check_cpu(target)
    preset = resolve(target, cuda_arch)
    hooks = family(preset)
    hooks.check_tools(preset)
    check_frame_options(scheme, redundancy, l_den, seed)
    cfg = scheme_config(scheme, redundancy=redundancy, l_den=l_den, seed=seed)
    quantize_head = quantize_head or head_scheme is not None
    given = {"calib=": calib, "calib_samples=": calib_samples, "calib_sequential=": calib_sequential or None,
             "denoise=": denoise or None, "fp_target=": fp_target or None, "refine=": refine or None,
             "pad_small=": pad_small, "quantize_head=": quantize_head}
    for text in ignored_options(cfg, given):
        warn(text)
    head_cfg = _head_config(cfg, head_scheme) if quantize_head and cfg.method != "none" else None
    if not calibrates(cfg):
        calib = calib_samples = None
    elif any(v is not None for v in (calib_sequential, denoise, fp_target, refine)):
        cfg = scheme_config(scheme, redundancy=redundancy, l_den=l_den, seed=seed,
                            sequential=None if calib_sequential is None else bool(calib_sequential),
                            denoise=None if denoise is None else bool(denoise),
                            fp_target=None if fp_target is None else bool(fp_target),
                            fp_residual=None if fp_target is None else bool(fp_target), refine=refine)
    check_bits(cfg, bits)
    if act_bits not in ACT_BITS:
        raise FqError(f"--act-bits must be one of {', '.join(map(str, ACT_BITS))}, not {act_bits}")
    if calibrates(cfg) and calib is None:
        raise FqError(f"scheme '{scheme}' needs calibration data: pass --calib FILE.npz (sample inputs "
                      f"keyed by input name, samples along the first axis)")
    if isinstance(calib, (str, Path)) and not Path(calib).is_file():
        raise FqError(f"{calib}: no such calibration file")
    model_path = Path(model)
    out_dir = default_out_dir(model_path, preset.name, scheme) if out_dir is None else out_dir
    keep = [path for path in (model_path, calib) if isinstance(path, (str, Path))]
    out_dir = check_output(out_dir, force, keep)
    build_time()  # a bad SOURCE_DATE_EPOCH fails before any work
    tuned, tuning_report = _tuning(tuning_db, preset, quiet)  # a bad --tuning-db fails before any work
    step = Steps(5 if cfg.method != "none" else 4, quiet)
    step(f"loading and importing {model_path}")
    proto = onnx_io.load_model(model_path)
    generation = _generation(proto, model_path)
    imported, proto = _import_first(proto, input_shapes)
    layers, layer_report, quantized = {}, {}, {}
    if cfg.method != "none":
        step(f"quantizing dense layers ({cfg.name})")
        layers, layer_report, quantized = _quantize(proto, cfg, calib, skip, quiet, calib_samples, pad_small,
                                                    head_cfg, bits)
    step("importing into Relax" + (" and rewriting dense layers" if layers else ""))
    pre_bounds = fast_take_bounds(imported[0]["main"])[0]  # a quantized head's gather is no take
    mod = _import(proto, layers, layer_report, quiet, imported)
    if generation is not None:  # generation's function: the last position's logits, the cache written in place
        import tvm

        from .passes.kv_cache import NAME as KV_NAME, STEP, AddCacheInPlace, AddDecodeStep
        from .passes.last_logits import NAME, AddLastLogits

        mod = AddDecodeStep()(AddCacheInPlace(2 * generation["layers"])(AddLastLogits()(mod)))
        names = [gvar.name_hint for gvar in mod.get_global_vars()]
        if KV_NAME in names:  # generate's function (the cache appended in place); it replaces main_last
            generation["kv_in_place"] = KV_NAME
            if STEP in names:  # and the same for one token (decoding)
                generation["kv_step"] = STEP
            mod = tvm.IRModule({gvar: func for gvar, func in mod.functions_items() if gvar.name_hint != NAME},
                               attrs=mod.attrs, global_infos=mod.global_infos)
        elif NAME in names:
            generation["last_logits"] = NAME
    if records is not None:  # only what the artifact really runs quantized
        kept = {entry["weight"] for entry in layer_report.get("layers", [])}
        records.update({name: rec for name, rec in quantized.items() if name in kept})
    step(f"building for {preset.name} {preset.target}")
    kernels = {"act_bits": act_bits, "counts": {}}
    if tuned is not None:
        kernels["tuning"] = tuning_report
    bounds, all_bounded = fast_take_bounds(mod["main"])
    bounds = {**pre_bounds, **bounds}
    executable = _build(mod, preset, act_bits, kernels["counts"], log_filter(all_bounded, quiet), quiet, tuned)
    with staging_dir(out_dir, force, keep) as tmp:
        step(f"writing {out_dir}")
        files = hooks.export(executable, tmp, preset)
        if generation is not None:
            files.extend(_copy_tokenizer(generation, model_path, tmp))
        manifest = _manifest(proto, model_path, preset, cfg, files)
        if generation is not None:
            manifest["generation"] = generation
        add_ranges(manifest["inputs"], bounds)
        manifest.update(layer_report)
        head = _head_entry(proto, layer_report)
        if head is not None:  # a tied embedding / LM head: quantized or fp32, its bits and bytes
            manifest["head"] = head
        manifest["kernels"] = kernels
        if layer_report.get("layers"):
            manifest["weights"].update(_weight_totals(layer_report["layers"], manifest["weights"]["bytes"]))
        write_manifest(tmp, manifest, files)
    step.show(f"done: {out_dir}")
    return out_dir


def _generation(proto, model_path: Path) -> dict | None:
    """The manifest's `generation` section of a causal LM exported with a KV cache (the ONNX
    metadata fq-export --kv-cache writes; kvcache.py), or None. A tokenizer named there but missing
    beside the model is left out with a warning (fq-generate then needs --tokenizer)."""
    from .artifact import generation_problem, sha256_input
    from .kvcache import read_generation

    meta = read_generation(proto)
    if meta is None:
        return None
    meta = {k: v for k, v in meta.items() if k != "max_abs_diff_vs_transformers"}
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None:
        path = model_path.parent / str(tokenizer.get("file"))
        if not path.is_file() or sha256_input(path) != tokenizer.get("sha256"):
            why = "missing" if not path.is_file() else "not the one exported with the model (checksum differs)"
            warn(f"{path} is {why}: the artifact gets no tokenizer (fq-generate will need --tokenizer)")
            meta.pop("tokenizer")
    files = {meta["tokenizer"]["file"]: meta["tokenizer"]["sha256"]} if "tokenizer" in meta else {}
    bad = generation_problem(meta, files, [i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    if bad:
        raise FqError(f"{model_path}: its generation metadata is invalid: {bad}")
    return meta


def _copy_tokenizer(generation: dict, model_path: Path, out: Path) -> list[str]:
    """The tokenizer file beside the model, gzip-compressed into the artifact as NAME.gz (no name
    or time in the header, so the bytes repeat): SmolLM2's tokenizer.json 3.5 -> 0.6 MB. The
    generation section then names the compressed file and its sha256."""
    import gzip

    from .artifact import sha256_file

    if "tokenizer" not in generation:
        return []
    source = model_path.parent / generation["tokenizer"]["file"]
    name = Path(generation["tokenizer"]["file"]).name + ".gz"
    (out / name).write_bytes(gzip.compress(source.read_bytes(), compresslevel=9, mtime=0))
    generation["tokenizer"] = {"file": name, "sha256": sha256_file(out / name)}
    return [name]


def calibrates(cfg) -> bool:
    """Whether the scheme (a numerics.QuantConfig) runs calibration: GPTQ and FrameQuant do."""
    return cfg.method in ("gptq", "framequant")


def uses_calibration(scheme: str) -> bool:
    """Whether the scheme named `scheme` calibrates (True for a name we do not know: compile says
    what is wrong with it)."""
    from .numerics import SCHEMES

    return scheme not in SCHEMES or calibrates(SCHEMES[scheme])


def ignored_options(cfg, given: dict) -> list[str]:
    """One warning line for the options in `given` ({flag or parameter name: value}) that the
    scheme does not use: calibration data for a scheme that does not calibrate, pad_small and
    quantize_head for fp32."""
    lines = []
    unused = [name for name, value in given.items() if value is not None and value is not False
              and (not calibrates(cfg) if _calibration_option(name) else cfg.method == "none")]
    calib = [name for name in unused if _calibration_option(name)]
    if calib:
        lines.append(f"{' and '.join(calib)} {'is' if len(calib) == 1 else 'are'} ignored: scheme {cfg.name} "
                     f"does not calibrate")
    other = [name for name in unused if not _calibration_option(name)]
    if other:
        lines.append(f"{' and '.join(other)} {'is' if len(other) == 1 else 'are'} ignored: scheme {cfg.name} "
                     f"does not quantize")
    return lines


def _calibration_option(name: str) -> bool:
    """Options that only calibrating schemes use (--calib*, --denoise, --fp-target, --refine)."""
    return any(word in name for word in ("calib", "denoise", "fp_target", "fp-target", "refine"))


def check_bits(cfg, bits) -> None:
    """--bits: a positive number, for a FrameQuant scheme."""
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 0 < bits < 32:
        raise FqError(f"--bits must be a number of bits per weight between 0 and 32, not {bits!r}")
    if cfg.method != "framequant":
        raise FqError(f"--bits chooses among FrameQuant options (frame redundancy, 4-bit codes); scheme {cfg.name} "
                      f"is not FrameQuant (use fq2, fq2r1, had2 or fq4)")


REDUNDANCY_RANGE = (1.0, 2.0)  # r = 2 already stores 4 bits per 2-bit weight


def check_frame_options(scheme: str, redundancy, l_den, seed=None) -> None:
    """--redundancy, --l-den and --seed shape the frame and rotation of FrameQuant schemes only;
    r in [1, 2], the seed a whole number in [0, 2^63)."""
    from .quantize import scheme_config

    if redundancy is None and l_den is None and seed is None:
        return
    if scheme_config(scheme).method != "framequant":
        flag = "--redundancy" if redundancy is not None else "--l-den" if l_den is not None else "--seed"
        raise FqError(f"{flag} applies to FrameQuant schemes (fq2, fq4, had2, ...), not '{scheme}'")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < 2**63):
        raise FqError(f"--seed must be a whole number from 0 to 2^63 - 1, not {seed!r}")
    low, high = REDUNDANCY_RANGE
    if redundancy is not None and not (math.isfinite(redundancy) and low <= redundancy <= high):
        raise FqError(f"--redundancy must be between {low} and {high} (1.0 = no frame), not {redundancy}")


def check_cpu(target) -> None:
    """Refuse the `mcpu` of a target JSON dict that LLVM does not know: TVM would print LLVM
    errors and quietly build for a generic CPU. Checked before TVM sees the dict, against LLVM's
    list for the dict's triple (asked without the bad mcpu, so LLVM prints nothing)."""
    import json

    try:
        config = json.loads(target) if isinstance(target, str) and target.strip().startswith("{") else None
    except json.JSONDecodeError:
        return  # targets.resolve says what is wrong with it
    if not isinstance(config, dict) or config.get("kind") != "llvm" or not config.get("mcpu"):
        return
    import difflib

    from tvm.target import Target, codegen

    triple = {k: config[k] for k in ("kind", "mtriple") if k in config}
    try:
        known = [str(cpu) for cpu in codegen.llvm_get_cpu_archlist(Target(triple))]
    except Exception:  # a bad triple: targets.resolve reports it
        return
    mcpu = str(config["mcpu"])
    if known and mcpu not in known:
        near = difflib.get_close_matches(mcpu, known, n=3) or known[:3]
        raise FqError(f"unknown CPU '{mcpu}' for {config.get('mtriple', 'this host')}: LLVM knows "
                      f"{len(known)} CPUs, e.g. {', '.join(near)} (--target host picks this machine's)")


def _head_config(cfg, head_scheme: str | None):
    """The QuantConfig of a quantized tied head: the body's, or `head_scheme`'s (FqError for one
    that does not quantize, or that calibrates under a body scheme that does not)."""
    from .quantize import scheme_config

    if head_scheme is None:
        return cfg
    head = scheme_config(head_scheme)
    if head.method == "none":
        raise FqError(f"--head-scheme {head_scheme}: that scheme does not quantize (leave out --quantize-head "
                      f"and --head-scheme to keep the head fp32)")
    if calibrates(head) and not calibrates(cfg):
        raise FqError(f"--head-scheme {head_scheme} calibrates, scheme {cfg.name} does not: choose a head scheme "
                      f"that does not calibrate (int8, rtn4, rtn2), or a calibrating body scheme")
    return head


def _quantize(proto, cfg, calib, skip, quiet, calib_samples=None, pad_small=False, head_cfg=None, bits=None):
    from .importer import param_name
    from .quantize import calibrate_layers, plan_layers, quantize_allocated, quantize_layers, quantize_sequential, to_packed

    plan = plan_layers(proto, skip, cfg=cfg, pad_small=pad_small, quantize_head=head_cfg is not None)
    for _, text in plan.padded:
        warn(text)
    hessians = configs = allocation = None
    if calibrates(cfg) and plan.chosen and (bits is not None or not cfg.sequential):
        hessians = calibrate_layers(proto, plan.all_uses(plan.chosen), calib, not quiet, calib_samples)
    if bits is not None and plan.chosen:  # chosen on the plain Hessians, then quantized as configured
        configs, allocation = quantize_allocated(proto, plan, cfg, hessians, bits, not quiet)
    if calibrates(cfg) and plan.chosen and cfg.sequential:  # each layer on the model quantized before it
        records = quantize_sequential(proto, plan, cfg, calib, not quiet, calib_samples, head_cfg, configs)
    else:
        records = quantize_layers(proto, plan, cfg, hessians, not quiet, head_cfg, configs)
    layers = {param_name(w): to_packed(r) for w, r in records.items()}
    report = {"layers": [_layer_entry(plan.names[layer.node], layer, records[layer.weight], layer.weight in plan.tied)
                         for layer in plan.chosen],
              "skipped": [{"name": plan.names[layer.node], "weight": layer.weight, "reason": reason,
                           "shape": [layer.out_features, layer.in_features]}
                          for layer, reason in plan.skipped]}
    if allocation is not None:
        report["allocation"] = allocation
    return layers, report, records


def _weight_totals(entries, fp32_total: int) -> dict:
    dense_fp32 = sum(4 * e["shape"][0] * e["shape"][1] for e in entries)
    dense_bytes = sum(e["bytes"] for e in entries)
    return {"fp32_bytes": fp32_total, "bytes": fp32_total - dense_fp32 + dense_bytes,
            "quantized_dense_fp32_bytes": dense_fp32, "quantized_dense_bytes": dense_bytes,
            "quantized_dense_bits_per_weight": round(8 * dense_bytes / (dense_fp32 / 4), 4)}


def _layer_entry(name, layer, record, tied: bool = False) -> dict:
    from .numerics import bits_per_weight, layer_bits

    entry = {"name": name, "weight": layer.weight, "shape": [layer.out_features, layer.in_features],
             "scheme": record.scheme, "bits": record.bits, "stored_shape": [record.rows, record.cols],
             "bits_per_weight": round(bits_per_weight(record), 4), "bytes": layer_bits(record) // 8}
    if tied:  # the tied embedding / LM head: one table, no output rotation, the embedding gathers its codes
        entry["tied"] = True
    if record.guard is not None:  # the held-out guard's choice (numerics/guard.py)
        entry["guard"] = record.guard
    return entry


def _head_entry(proto, report: dict) -> dict | None:
    """The manifest's `head`: the tied embedding / LM head, quantized (scheme, bits, bytes) or
    kept fp32 (bytes); None for a model without one."""
    from .quantize import find_tied_head

    head = find_tied_head(proto)
    if head is None:
        return None
    entry = next((e for e in report.get("layers", []) if e.get("tied")), None)
    shape = [head.out_features, head.in_features]
    if entry is None:
        return {"weight": head.weight, "shape": shape, "quantized": False, "bits": 32, "bytes": 4 * shape[0] * shape[1]}
    return {"weight": head.weight, "shape": shape, "quantized": True, "scheme": entry["scheme"], "bits": entry["bits"],
            "bits_per_weight": entry["bits_per_weight"], "bytes": entry["bytes"]}


def _import_first(proto, input_shapes):
    """Prepare and import before any calibration, so a model we cannot import fails in seconds."""
    from .frontend import parse_input_shapes, prepare
    from .importer import to_relax

    proto = prepare(proto, parse_input_shapes(input_shapes))
    return to_relax(proto), proto


def _import(proto, layers=None, report=None, quiet=True, imported=None):
    from .importer import bind_weights, param_name, to_relax

    mod, weights = imported or to_relax(proto)
    if layers:
        from .passes.quantize_dense import QuantizeDense
        from .passes.tied_head import QuantizeTiedHead

        tied = {param_name(e["weight"]) for e in report["layers"] if e.get("tied")}
        rewrite = QuantizeDense({name: layer for name, layer in layers.items() if name not in tied})
        mod = rewrite(mod)
        heads = QuantizeTiedHead({name: layers[name] for name in tied})
        mod = heads(mod)
        missed = set(layers) - set(rewrite.rewritten_params) - set(heads.rewritten)
        if missed:
            _unmatched(report, missed)
    if report and not quiet:
        for entry in report["skipped"]:
            print(f"    kept fp32: {entry['name']} {entry['shape']}: {entry['reason']}", file=sys.stderr)
    from .passes.rms_norm import FuseRMSNorm
    from .passes.slice_heads import SliceHeads
    from .passes.swiglu import FuseSwiGLU
    from .passes.tied_weights import StoreTiedWeightsOnce

    return FuseSwiGLU()(SliceHeads()(FuseRMSNorm()(StoreTiedWeightsOnce()(bind_weights(mod, weights)))))


def _unmatched(report, params) -> None:
    """Layers found in ONNX whose Relax form the pass did not match stay fp32; say so."""
    from .importer import param_name

    keep = []
    for entry in report["layers"]:
        if param_name(entry["weight"]) in params:
            report["skipped"].append({"name": entry["name"], "weight": entry["weight"], "shape": entry["shape"],
                                      "reason": "its Relax form was not a plain matmul"})
        else:
            keep.append(entry)
    report["layers"] = keep


def _tuning(tuning_db, preset, quiet: bool):
    """The `before_fallback` hook applying an fq-tune database and the report it fills (the
    manifest's `kernels["tuning"]`), or (None, None)."""
    if tuning_db is None:
        return None, None
    from .tuning import Applier

    report = {}
    return Applier(tuning_db, preset, report, quiet), report


def _build(mod, preset, act_bits: int, counts: dict, drop=None, quiet: bool = True, before_fallback=None):
    import tvm

    from .schedules import apply as schedule_kernels
    from .schedules import relax_pipeline

    target = preset.tvm_target()
    try:
        with without_log_lines(drop):
            mod = schedule_kernels(mod, target, act_bits, counts)
            notes = []
            executable = tvm.compile(mod, target, relax_pipeline=relax_pipeline(target, counts, notes, before_fallback))
            for note in notes if not quiet else []:
                print(f"    note: kept TVM's plain lowering (no schedule fits): {note}", file=sys.stderr)
            return executable
    except FqError:
        raise
    except Exception as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise FqError(f"TVM build for '{preset.name}' failed: {lines[-1] if lines else type(err).__name__}") from None


def _manifest(proto, model_path: Path, preset, cfg, files: list[str]) -> dict:
    import onnx
    import tvm

    from .artifact import sha256_input
    from .onnx_io import signature, weight_bytes

    sig = signature(proto)
    return {
        "created": build_time().isoformat(timespec="seconds"),
        "versions": {"fq_tvm": __version__, "tvm": tvm.__version__, "onnx": onnx.__version__},
        "source": {"model": model_path.name, "sha256": sha256_input(model_path)},
        "target": {"name": preset.name, "tvm": preset.target, "arch": preset.arch, "device": preset.device},
        "scheme": cfg.to_meta(),
        "weights": {"bytes": weight_bytes(proto)},
        "library": files[0],
        "inputs": sig["inputs"],
        "outputs": sig["outputs"],
    }

"""SmolLM2-135M through fq-compile: perplexity of compiled artifacts on Pride and Prejudice.

    bash scripts/fetch_data.sh --smollm2
    python benchmarks/smollm2_perplexity.py fp32 fq2 fq2r1 gptq2 rtn2

2 windows of 512 tokens (the first 1024 tokens of the book), calibration on 16 Wikipedia windows
of 256 tokens. Prints one JSON line per scheme. Work files go to /tmp/smol.
"""
import time, json, sys, numpy as np
from pathlib import Path
import fq_tvm
from fq_tvm import realmodels, evaluate
from fq_tvm.quantize import plan_layers
import onnx
work=Path('/tmp/smol')
t=time.time(); onnx_path=realmodels.export_smollm2(work); print('export', time.time()-t, flush=True)
calib=work/'calib.npz'
if not calib.exists(): realmodels.smollm2_calib(calib)
tok=realmodels.smollm2_tokenizer()
windows=evaluate.austen_windows(tok, n_windows=2, window=512)
plan=plan_layers(onnx.load(str(onnx_path), load_external_data=True), skip='lm_head')
print('layers', len(plan.chosen), 'skipped', [(l.node, r) for l,r in plan.skipped][:3], flush=True)
for scheme in sys.argv[1:]:
    t=time.time()
    out=fq_tvm.compile(onnx_path,'host',work/f'smol.{scheme}',scheme=scheme,calib=calib,skip='lm_head',force=True,quiet=True)
    tc=time.time()-t; t=time.time()
    ppl=evaluate.perplexity(evaluate.artifact_runner(out), windows)
    print(json.dumps({'scheme':scheme,'ppl':ppl,'compile_s':tc,'eval_s':time.time()-t}), flush=True)

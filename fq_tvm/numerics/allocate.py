"""Per-group choice of quantization options under a total bit budget.

Each group (the layers reading one activation, which share an input transform) has options, each
with a cost (stored bits) and an error (the sum of its layers' held-out output errors, guard.py).
`allocate` starts every group at its cheapest option and repeatedly takes the upgrade with the
largest error decrease per extra bit that still fits the budget (greedy on the marginal rates;
an upgrade may skip options). Options that cost more and do not lower the error are never taken.
"""

from __future__ import annotations


def allocate(groups: dict, budget: float) -> dict:
    """groups: {group: {option: (bits, error)}}; budget: total bits. Returns {group: option}.
    The cheapest options must fit (ValueError otherwise)."""
    choice = {g: min(opts, key=lambda o: (opts[o][0], opts[o][1])) for g, opts in groups.items()}
    used = sum(groups[g][o][0] for g, o in choice.items())
    if used > budget:
        raise ValueError(f"the budget ({budget:.0f} bits) is below the cheapest choice ({used:.0f} bits)")
    while True:
        best = None
        for g, opts in groups.items():
            bits, err = opts[choice[g]]
            for o, (b, e) in opts.items():
                extra, gain = b - bits, err - e
                if extra > 0 and gain > 0 and used + extra <= budget and (best is None or gain / extra > best[0]):
                    best = (gain / extra, g, o, extra)
        if best is None:
            return choice
        _, g, o, extra = best
        choice[g], used = o, used + extra


ALLOC_REDUNDANCY = (1.0, 1.25, 1.5)  # besides the scheme's own; with l_den 8: k = 8, 10, 12
ALLOC_4BIT_CLIP = 3.0  # fq4's sigma clip


def allocation_options(cfg) -> dict:
    """{label: QuantConfig} the allocation chooses from for a FrameQuant scheme: its own config, the
    same at the other ALLOC_REDUNDANCY values (one per distinct frame size k), and 4-bit codes
    without a frame."""
    from dataclasses import replace

    from .frames import frame_k

    if cfg.method != "framequant":
        raise ValueError(f"bit allocation needs a FrameQuant scheme, not '{cfg.name}' (method {cfg.method})")
    out, ks = {f"{cfg.name} r={cfg.redundancy:g}": cfg}, {frame_k(cfg.l_den, cfg.redundancy)}
    for r in ALLOC_REDUNDANCY:
        k = frame_k(cfg.l_den, r)
        if k not in ks:
            ks.add(k)
            out[f"{cfg.name} r={r:g}"] = replace(cfg, redundancy=r)
    if cfg.bits < 4:
        out["4-bit r=1"] = replace(cfg, name="fq4", bits=4, clip_sigma=ALLOC_4BIT_CLIP, redundancy=1.0)
    return out

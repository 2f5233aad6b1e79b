"""The white-box permutation p of a 2x-resolution pirate's weights, read at the secret's resolution (what
`awenc verify` does since 2026-12-07, ``verify.resize.weights_at``) and, beside it, fed queries resized to the
pirate's 32 px (the rule before). results/resolution/README.md quotes both.

    .venv/bin/python scripts/resolution_weights.py [DEMO_DIR] [ENCODER_FOLDER]   # defaults: runs/demo, embed

The derivatives are ``finetune_resolution@2`` with the attack registry's defaults, seeds 0-4, as in
configs/robustness/resolution.yaml (the same derivatives `scripts/resolution.sh` makes). About 30 s a seed here.
"""
import sys

from dist_awenc.attacks import AttackOptions, apply_attack
from dist_awenc.config import DataSection, ProbeSection, VerifySection
from dist_awenc.stages.robustness import Context
from dist_awenc.verify.permutation import verify_permutation
from dist_awenc.verify.resize import Resized
from dist_awenc.verify.run import query_images

demo = sys.argv[1] if len(sys.argv) > 1 else "runs/demo"
which = sys.argv[2] if len(sys.argv) > 2 else "embed"
ctx = Context.load(f"{demo}/{which}/encoder.safetensors", f"{demo}/watermark/secret.safetensors",
                   DataSection(name="digits", image_size=16), AttackOptions(), ProbeSection(), VerifySection())
x = query_images(ctx.holdout, ctx.settings["whitebox"].n, "whitebox")
print(f"{which} itself, 16 px: p = {verify_permutation(ctx.encoder, ctx.secret, ctx.alternatives, x).p_value:g}")
print("| seed | relative weight change | p, weights read at 16 px | p, queries resized to 32 px |")
print("|---|---|---|---|")
for seed in range(5):
    att, det = apply_attack("finetune_resolution", ctx.encoder, ctx.card, 2.0,
                            ctx.pirate.attack_data(ctx.probe.test_fraction, seed), ctx.options, progress=False)
    native = verify_permutation(att, ctx.secret, ctx.alternatives, x).p_value
    resized = verify_permutation(Resized(att, att.input_size), ctx.secret, ctx.alternatives, x).p_value
    print(f"| {seed} | {det['rel_weight_change']:.4f} | {native:g} | {resized:g} |", flush=True)

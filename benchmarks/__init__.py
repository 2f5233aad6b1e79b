"""Throughput benchmarks of dist_awenc: ``python -m benchmarks <suite> [--quick]``.

Suites (see ``benchmarks/README.md``):

* ``step``: the project's pre-training and embedding steps (through
  :func:`dist_awenc.engine.loop.fit`) against a hand-written PyTorch loop doing
  the same step, in the same process, alternating repetitions;
* ``loader``: images/s per CPU core of the loaders, contrastive views included;
* ``e2e``: the real ``awenc pretrain`` under ``accelerate launch`` against the
  reference step alone;
* ``verify``: seconds of white-box and black-box label verification on CPU;
* ``cost``: device-seconds of watermark generation + embedding as a fraction
  of the pre-training run they protect;
* ``health``: what throughput cannot show about the ImageNet SimCLR recipe:
  peak GPU memory at its per-GPU batch, SyncBN statistics across ranks, and
  that its loss falls over a few hundred steps.

Each suite writes ``<out>/<suite>.json`` (schema: :mod:`benchmarks.common`)
and ``<out>/<suite>.md``.
"""

SUITES = ("step", "loader", "e2e", "verify", "cost", "health")

"""Optional FFCV data path: ``.beton`` writing and a batch source reading it.

FFCV (``ffcv==1.0.2``, the ``ffcv`` extra) needs system libraries (OpenCV,
libjpeg-turbo, pkg-config); ``scripts/install_ffcv.sh`` installs them and it.
This module imports without FFCV: every entry point that needs it raises
:class:`FFCVNotInstalledError` with the install steps, and the torchvision
path (:class:`~dist_awenc.data.sampler.SamplerSource`) stays the default.

* :func:`write_beton` turns any registered dataset (or a split of it) into a
  ``.beton`` with the fields ``image`` (RGB, raw or JPEG), ``label`` and
  ``index`` (the item's index in the source dataset), atomically: it writes a
  temporary file next to the target and renames it only once complete.
* :class:`FFCVSource` is a batch source for the training loop's ``fit``:
  ``iterate(epoch, start)`` yields ``(images (b,3,S,S) float [0,1], labels (b,),
  index (b,))`` in exactly the order of :class:`GlobalBatchSampler` with the
  same seed, world size and rank, decoding on CPU threads (FFCV's JIT
  pipeline) and handing uint8 batches to the device, where they become float.
  The contrastive views are made afterwards on the device by
  :func:`~dist_awenc.data.views.make_views`, exactly as with the torchvision
  source, so both sources give the same view distribution.
* :func:`write_beton_stage` is ``awenc data write-beton``: a :class:`BetonConfig`
  (a ``data`` section as in every stage, and a ``beton`` section) -> one file.
"""
from dist_awenc.data.ffcv._common import BetonWriteError, FFCVNotInstalledError, ffcv_available
from dist_awenc.data.ffcv.loader import FFCVSource
from dist_awenc.data.ffcv.stage import BetonConfig, BetonSection, beton_path, build_source, source_options, write_beton_stage
from dist_awenc.data.ffcv.writer import write_beton

__all__ = [
    "BetonConfig",
    "BetonSection",
    "BetonWriteError",
    "FFCVNotInstalledError",
    "FFCVSource",
    "beton_path",
    "build_source",
    "source_options",
    "ffcv_available",
    "write_beton",
    "write_beton_stage",
]

"""Test-only: let the CUDA build of torchvision import next to the CPU build of torch.

Why this exists: torchvision 0.28.0 is the only release that matches torch 2.13.0, and the only build of it
that this CI machine can install is compiled against CUDA. Its C++ operators (nms, roi_align, ...) then fail to
load, and `import torchvision` dies in torchvision/_meta_registrations.py with
"operator torchvision::nms does not exist" — before any dataset code runs. The recipes only use torchvision's
datasets and transforms, which are pure Python, so declaring the operator *schemas* (without kernels) is
enough for the import to succeed. Calling one of these operators would still fail loudly.

How it is used: the tests put this directory on PYTHONPATH of the recipe processes they start, so Python
imports this file at startup. It does nothing until something imports torchvision, and then only if
torchvision's compiled operators cannot be loaded. It never ships with a recipe: on a GPU cluster, or with a
CPU build of torchvision, none of this is needed.
"""

import importlib.abc
import importlib.machinery
import os
import sys

# The operators torchvision/_meta_registrations.py registers fake kernels for, with their argument lists.
_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
                 "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward": "(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
                           "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
                           "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
                    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward": "(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
                              "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
                              "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "roi_pool": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
                "-> (Tensor, Tensor)",
    "_roi_pool_backward": "(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
                          "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) "
                          "-> Tensor",
    "ps_roi_pool": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
                   "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward": "(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
                             "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
                             "SymInt height, SymInt width) -> Tensor",
    "qroi_align": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
                  "int sampling_ratio, bool aligned) -> Tensor",
    "deform_conv2d": "(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
                     "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
                     "SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward": "(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
                               "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
                               "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, "
                               "bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}
_library = None  # keeps the registrations alive


def _declare_missing_operators():
    global _library
    if _library is not None:
        return
    import torch

    spec = importlib.machinery.PathFinder.find_spec("torchvision")  # not find_spec: that would call us again
    compiled = os.path.join(os.path.dirname(spec.origin), "_C.so") if spec and spec.origin else None
    try:
        if compiled:
            torch.ops.load_library(compiled)
            return  # torchvision's own operators load: nothing to do
    except OSError:
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for name, schema in _SCHEMAS.items():
        _library.define(name + schema)


def _use_test_checksums(cifar_module):
    """CIFAR-10's loader checks the md5 of every file against the official ones. Files a test generated in the
    same format cannot match those, so a test passes the checksums of its own files in TEST_CIFAR10_MD5; the
    check itself still runs, on the real code path."""
    import json
    import os

    md5 = json.loads(os.environ["TEST_CIFAR10_MD5"])
    cls = cifar_module.CIFAR10
    cls.train_list = [[name, md5[name]] for name, _ in cls.train_list]
    cls.test_list = [[name, md5[name]] for name, _ in cls.test_list]
    cls.meta = {**cls.meta, "md5": md5[cls.meta["filename"]]}


def _use_test_mirror(mnist_module):
    """MNIST's download, from a server a test runs (TEST_MNIST_MIRROR, a URL ending in /) instead of the
    internet, checked against the md5 of the test's own .gz files (TEST_MNIST_MD5): torchvision's real download,
    check and extraction code runs."""
    import json
    import os

    md5 = json.loads(os.environ["TEST_MNIST_MD5"])
    cls = mnist_module.MNIST
    cls.mirrors = [os.environ["TEST_MNIST_MIRROR"]]
    cls.resources = [(name, md5[name]) for name, _ in cls.resources]


class _Patched(importlib.abc.Loader):
    def __init__(self, loader, after):
        self.loader, self.after = loader, after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.after(module)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    patches = {"torchvision.datasets.cifar": ("TEST_CIFAR10_MD5", _use_test_checksums),
               "torchvision.datasets.mnist": ("TEST_MNIST_MIRROR", _use_test_mirror)}

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            _declare_missing_operators()
        elif name in self.patches and self.patches[name][0] in os.environ:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            spec.loader = _Patched(spec.loader, self.patches[name][1])
            return spec
        return None  # the normal import machinery does the import itself


sys.meta_path.insert(0, _BeforeTorchvision())

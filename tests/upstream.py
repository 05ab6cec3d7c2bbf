"""The real qwen-vl-utils package and HF's video frame sampler, imported although torchvision is absent.

Both import torchvision at the top of their module but the parts tested here do not need it, except
qwen-vl-utils' final video resize, which the stand-in does as torchvision does for tensors: torch's antialiased
bicubic interpolation, rounded back to the input's integer dtype. Sizes, frame counts and indices are always
the real package's own.
"""
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from contextlib import contextmanager

import pytest


def _resize(video, size, interpolation=None, antialias=True):
    import torch

    out = torch.nn.functional.interpolate(video.float(), size=list(size), mode="bicubic", antialias=antialias,
                                          align_corners=False)
    if not video.dtype.is_floating_point:
        out = out.clamp(0, 255).round().to(video.dtype)
    return out


def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    return module


@contextmanager
def _stand_in_torchvision():
    functional = _module("torchvision.transforms.functional", resize=_resize)
    v2_functional = _module("torchvision.transforms.v2.functional")
    v2 = _module("torchvision.transforms.v2", functional=v2_functional)
    interpolation = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest")
    transforms = _module("torchvision.transforms", functional=functional, v2=v2, InterpolationMode=interpolation)

    def no_read_video(*args, **kwargs):
        raise RuntimeError("torchvision.io.read_video is not available in the tests")

    io = _module("torchvision.io", read_video=no_read_video)
    torchvision = _module("torchvision", __version__="0.20.0", io=io, transforms=transforms)
    stand_ins = {m.__name__: m for m in (torchvision, io, transforms, functional, v2, v2_functional)}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def qwen_vl_utils():
    """The installed qwen_vl_utils.vision_process (pytest skips when the package is not installed)."""
    if importlib.util.find_spec("qwen_vl_utils") is None:
        pytest.skip("qwen-vl-utils is not installed (pip install qwen-vl-utils, the test extra)")
    if "qwen_vl_utils.vision_process" not in sys.modules:
        with _stand_in_torchvision():
            importlib.import_module("qwen_vl_utils.vision_process")
    return sys.modules["qwen_vl_utils.vision_process"]


def qwen_vl_utils_version():
    from importlib.metadata import version

    return version("qwen-vl-utils")


def hf_video_processor_class():
    """HF 4.57's Qwen2VLVideoProcessor class (its methods that need only torch can be called unbound)."""
    name = "transformers.models.qwen2_vl.video_processing_qwen2_vl"
    if name not in sys.modules:
        with _stand_in_torchvision():
            importlib.import_module(name)
    return sys.modules[name].Qwen2VLVideoProcessor

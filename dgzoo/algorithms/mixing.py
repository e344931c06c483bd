"""MixStyle (Zhou et al., ICLR 2021) and EFDMix (Zhang et al., CVPR 2022) as add-ons: ``erm+mixstyle``,
``coral+efdmix``, any host.

Both are backbone operations rather than losses, so they compose with a host's objective as the papers combine
them: the add-on hooks the host network's stage outputs (default after ``layer1``..``layer3``, the papers'
res1-3) and every training-mode forward pass of the host mixes there with probability ``p``. Evaluation passes,
the exported model and copies of the network (SWAD/EMA averages, MIRO's frozen reference) never mix; the network's
state dict is untouched, so the export is the plain timm backbone. The operations themselves are in
:mod:`dgzoo.models.mixing`.

The partner of each sample is drawn at random in the batch by default (``mix=random``, the released modules'
default, which needs no domain labels and works the same for single-source training and for hosts that pass
one domain at a time); ``mix=crossdomain`` pairs each domain's samples with another domain's, as the papers'
domain-label variant.
"""

from __future__ import annotations

import functools
from typing import Any

from ..errors import DGZooError
from ..hparams import Choice, HParam
from ..models.mixing import MIX_MODES, StyleMixing, efdmix, mixing_stages, mixstyle
from .base import AddOn, Algorithm, Recipe, StepContext
from .registry import register_addon
from .runtime import Runtime

MIXSTYLE_CITATION = """@inproceedings{zhou2021domain,
  title={Domain Generalization with MixStyle},
  author={Zhou, Kaiyang and Yang, Yongxin and Qiao, Yu and Xiang, Tao},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2021}
}"""
EFDMIX_CITATION = """@inproceedings{zhang2022exact,
  title={Exact Feature Distribution Matching for Arbitrary Style Transfer and Domain Generalization},
  author={Zhang, Yabin and Li, Minghan and Li, Ruihuang and Jia, Kui and Zhang, Lei},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={8035--8045},
  year={2022}
}"""

_SHARED = {
    "p": HParam(
        0.5, "probability that a stage mixes in a training forward pass (official 0.5)", minimum=0.0, maximum=1.0
    ),
    "alpha": HParam(
        0.1,
        "the mixing weight is drawn from Beta(alpha, alpha) per sample (official 0.1)",
        minimum=1e-6,
        search=Choice((0.1, 0.2, 0.3)),
    ),
    "mix": HParam(
        "random",
        "partner of each sample: 'random' in the batch (official default) or 'crossdomain' "
        "(another source domain's sample, when the batch is the host's pooled domain minibatches)",
        choices=MIX_MODES,
    ),
    "layers": HParam(
        "1,2,3",
        "stages after which to mix, comma-separated, 1-based (ResNet layer1..layer4; "
        "DenseNet denseblock1..3, norm5); the papers mix after res1-3",
    ),
}


def parse_layers(text: str, key: str) -> list[int]:
    """``'1,2,3'`` as ``[1, 2, 3]``, or a one-line DGZooError."""
    try:
        layers = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        layers = []
    if not layers or len(set(layers)) != len(layers):
        raise DGZooError(f"hparam {key}={text!r} must list distinct stage numbers, e.g. {key}=1,2,3")
    return sorted(layers)


class FeatureMixing(AddOn):
    """Base of the two add-ons: one :class:`~dgzoo.models.mixing.StyleMixing` hook per chosen stage."""

    COMPILABLE = False
    COMPILE_REFUSAL = (
        "its style-mixing forward hooks decide in Python, call by call, whether to mix, which a "
        "compiled network would fix at its first call"
    )

    @classmethod
    def op(cls, hparams: dict[str, Any]) -> Any:
        raise NotImplementedError

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        parse_layers(hparams["layers"], f"{cls.name}.layers")

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        if recipe.network is not None:
            mixing_stages(recipe.network, parse_layers(hparams["layers"], f"{cls.name}.layers"), cls.name)

    def __init__(self, host: Algorithm, hparams: dict[str, Any], runtime: Runtime):
        super().__init__(host, hparams, runtime)
        names = mixing_stages(host.network, parse_layers(hparams["layers"], f"{self.name}.layers"), self.name)
        modules = dict(host.network.named_modules())
        self.hooks = [StyleMixing(self.op(hparams), hparams["p"], hparams["alpha"], hparams["mix"]) for _ in names]
        self.handles = [modules[name].register_forward_hook(hook) for name, hook in zip(names, self.hooks)]
        self.stages = names

    def before_update(self, context: StepContext) -> dict[str, float]:
        sizes = [len(y) for _, y in context.minibatches]
        for hook in self.hooks:
            hook.domain_sizes = sizes
        return {}

    def diagnostics(self) -> dict[str, float]:
        """The fraction of training-mode stage outputs that were mixed (about ``p``; 0: the add-on never acted)."""
        calls = sum(h.calls for h in self.hooks)
        return {"mixed_fraction": sum(h.mixed for h in self.hooks) / calls} if calls else {}

    def summary(self) -> dict[str, Any]:
        calls = sum(h.calls for h in self.hooks)
        if not calls:
            return {}
        return {"stages": list(self.stages), "mixed_fraction": sum(h.mixed for h in self.hooks) / calls}


@register_addon
class MixStyle(FeatureMixing):
    """Mix the channel-wise mean and standard deviation of stage outputs between samples."""

    name = "mixstyle"
    title = "MixStyle"
    paper = "Zhou et al., ICLR 2021"
    citation = MIXSTYLE_CITATION
    HPARAMS = {
        **_SHARED,
        "eps": HParam(1e-6, "added to the variance before its square root (official 1e-6)", minimum=0.0),
    }

    @classmethod
    def op(cls, hparams: dict[str, Any]) -> Any:
        return functools.partial(mixstyle, eps=hparams["eps"])


@register_addon
class EFDMix(FeatureMixing):
    """Mix the sorted values (the whole empirical distribution) of stage outputs between samples."""

    name = "efdmix"
    title = "EFDMix (exact feature distribution mixing)"
    paper = "Zhang et al., CVPR 2022"
    citation = EFDMIX_CITATION
    HPARAMS = dict(_SHARED)

    @classmethod
    def op(cls, hparams: dict[str, Any]) -> Any:
        return efdmix

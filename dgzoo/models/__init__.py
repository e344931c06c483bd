"""timm backbones, the featurizer/classifier view of them (:mod:`.backbones`), and which rows write which channel
(:mod:`.anatomy`)."""

from .anatomy import ChannelLayer, ChannelSlice, ResNetTail, masked_ascent
from .backbones import (
    HUB_PREFIXES,
    check_backbone,
    classifier,
    classifier_parameter_names,
    create_backbone,
    data_config,
    feature_dim,
    features,
    featurizer_parameters,
    freeze_batchnorm,
    has_fixed_input_size,
    meta_backbone,
)

__all__ = [
    "ChannelLayer",
    "ChannelSlice",
    "HUB_PREFIXES",
    "ResNetTail",
    "check_backbone",
    "classifier",
    "classifier_parameter_names",
    "create_backbone",
    "data_config",
    "feature_dim",
    "featurizer_parameters",
    "features",
    "freeze_batchnorm",
    "has_fixed_input_size",
    "masked_ascent",
    "meta_backbone",
]

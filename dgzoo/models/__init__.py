"""timm backbones and the featurizer/classifier view of them (see :mod:`dgzoo.models.backbones`)."""
from .backbones import (HUB_PREFIXES, check_backbone, classifier, classifier_parameter_names, create_backbone,
                        data_config, feature_dim, featurizer_parameters, features, freeze_batchnorm,
                        has_fixed_input_size, meta_backbone)

__all__ = ["HUB_PREFIXES", "check_backbone", "classifier", "classifier_parameter_names", "create_backbone",
           "data_config", "feature_dim", "featurizer_parameters", "features", "freeze_batchnorm",
           "has_fixed_input_size", "meta_backbone"]

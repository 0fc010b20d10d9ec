"""CycleMLP's feature backbones for PaddleSeg: `import paddleseg_backbone` registers
CycleMLP_B1_feat .. CycleMLP_B5_feat (zoo.create_backbone's models, `pretrained` a weights file or
a variant's name for its official ImageNet weights). The paper's Semantic FPN configs, with
PaddleSeg's PFPNNet head: configs/paddleseg/ (docs/dense.md). Tested with PaddleSeg 2.8.0.
"""
from typing import Optional
import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it

from paddleseg.cvlibs import manager
from paddleseg.utils import logger

import zoo
from cyclemlp import ARCHITECTURES, CycleNet
from safe_io import printable


def backbone_factory(name: str):
    # PaddleSeg gives a backbone the image channels of a dataset class (ADE20K's 3) as in_channels.
    def build(pretrained: Optional[str] = None, drop_path_rate: float = 0.0, in_channels: int = 3) -> CycleNet:
        if in_channels != 3:
            raise ValueError(f'{name}_feat takes RGB images (in_channels 3), not in_channels={in_channels!r}')
        model, loaded = zoo.create_backbone(name, pretrained, drop_path_rate=drop_path_rate)
        if pretrained is not None:
            logger.info(f'{name}_feat: {printable(loaded)}')
        return model
    build.__name__ = f'{name}_feat'      # the name a config's `type:` gives
    return build


for variant in ARCHITECTURES:
    manager.BACKBONES.add_component(backbone_factory(variant))

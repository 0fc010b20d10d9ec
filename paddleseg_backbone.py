"""CycleMLP's feature backbones for PaddleSeg: importing this module registers CycleMLP_B1_feat ..
CycleMLP_B5_feat as PaddleSeg backbones (it imports PaddleSeg; nothing else in this repo does).

    # before the config is read (configs/launch.py does it for PaddleSeg's tools/*.py):
    import paddleseg_backbone  # noqa: F401

    model:                              # the paper's segmentation model is Semantic FPN;
      type: PFPNNet                     # PaddleSeg's PFPNNet is the same FPN head
      backbone:
        type: CycleMLP_B1_feat
        pretrained: CycleMLP_B1         # ImageNet weights: a file, or the official ones by name
      backbone_indices: [0, 1, 2, 3]
      fpn_inplanes: [64, 128, 320, 512]
      channels: 256
      num_classes: 150

A backbone is zoo.create_backbone's model: the official feature model (CycleNet(fork_feat=True)),
`feat_channels` the widths of its four maps, forward returning them as a list of (B, C, H, W).
The paper's complete configs: configs/paddleseg/. Tested with PaddleSeg 2.8.0 on Paddle 2.6.2
(tests/test_dense_toolkits.py).
"""
from typing import Optional
import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it

from paddleseg.cvlibs import manager
from paddleseg.utils import logger

import zoo
from cyclemlp import ARCHITECTURES, CycleNet
from weights import printable


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
    build.__doc__ = f'{name}\'s feature backbone for PaddleSeg (see the module doc).'
    return build


for variant in ARCHITECTURES:
    manager.BACKBONES.add_component(backbone_factory(variant))

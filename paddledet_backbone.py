"""CycleMLP's feature backbones for PaddleDetection: `import paddledet_backbone` registers the
backbone class CycleMLPFeat (configs/paddledet/ holds the paper's RetinaNet and Mask R-CNN
configs; docs/dense.md). Tested with PaddleDetection 2.6.0.

It wraps zoo.create_backbone's model cut to what return_idx uses: later stages are removed and
the norms of stages not returned are identities (as FORK_LAST3 makes the first), so every
parameter gets a gradient, as DataParallel with find_unused_parameters=False requires.
"""
from typing import List, Optional, Sequence
import zlib  # noqa: F401  before Paddle: Paddle 2.6 bundles a zlib that crashes one loaded after it

import paddle.nn as nn
from ppdet.core.workspace import register, serializable
from ppdet.modeling.shape_spec import ShapeSpec
from ppdet.utils.logger import setup_logger

import zoo
from safe_io import printable

STRIDES = (4, 8, 16, 32)
logger = setup_logger(__name__)


@register
@serializable
class CycleMLPFeat(nn.Layer):
    """The feature maps of stages `return_idx` (0..3, strides 4..32) of a CycleMLP variant."""
    __shared__ = []

    def __init__(self, variant: str = 'CycleMLP_B1', pretrained: Optional[str] = None,
                 fork_last3: bool = True, return_idx: Sequence[int] = (1, 2, 3), drop_path_rate: float = 0.0):
        super().__init__()
        return_idx = list(return_idx)
        if not (return_idx and all(index in range(4) for index in return_idx) and return_idx == sorted(set(return_idx))):
            raise ValueError(f'CycleMLPFeat: return_idx must be increasing stage indices in 0..3, got {return_idx!r}')
        if fork_last3 and 0 in return_idx:
            raise ValueError('CycleMLPFeat: fork_last3 has no norm for stage 0; leave it out of return_idx')
        self.body, loaded = zoo.create_backbone(variant, pretrained, fork_last3, drop_path_rate)
        if pretrained is not None:
            logger.info(f'CycleMLPFeat: {printable(loaded)}')
        self.return_idx = return_idx
        # network holds stages at even indices and downsampling layers between them.
        del self.body.network[2 * return_idx[-1] + 1:]
        for stage in set(range(return_idx[-1] + 1)) - set(return_idx):
            self.body.add_sublayer(f'norm{2 * stage}', nn.Identity())
        for stage in range(return_idx[-1] + 1, 4):
            delattr(self.body, f'norm{2 * stage}')

    def forward(self, inputs: dict) -> List:
        maps = self.body(inputs['image'])    # stages 0 .. return_idx[-1]
        return [maps[index] for index in self.return_idx]

    @property
    def out_shape(self) -> List[ShapeSpec]:
        return [ShapeSpec(channels=self.body.feat_channels[index], stride=STRIDES[index])
                for index in self.return_idx]

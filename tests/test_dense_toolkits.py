"""CycleMLP's feature backbones in the real toolkits, built from configs as their users build
models: PaddleSeg 2.8 (PFPNNet, the paper's Semantic FPN) and PaddleDetection 2.6 (RetinaNet),
trained a few optimizer steps on a synthetic batch: the loss must fall.

The toolkits are not the repo's requirements: .ci/run installs them in its Paddle 2.6.2
environment (the era's pairing) and runs this file there with CYCLEMLP_TOOLKITS=required, which
turns a missing toolkit into a failure; elsewhere these tests are skipped."""
import importlib
import os

# Paddle 2.6.2's wheel carries zlib symbols that clash with the newest pycocotools and lap wheels
# (which PaddleDetection imports): imported after Paddle they crash the process (found here), so
# they are imported first, as the README says.
for _module in ('pycocotools.coco', 'lap'):
    try:
        importlib.import_module(_module)
    except ImportError:
        pass

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import pytest  # noqa: E402

REQUIRED = os.environ.get('CYCLEMLP_TOOLKITS') == 'required'
STEPS = 8


def toolkit(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        if REQUIRED:
            raise
        pytest.skip(f'{module} is not installed (.ci/run tests it in its Paddle 2.6 environment)')


def falling(losses: list) -> bool:
    return all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]


PADDLESEG_CONFIG = '''
batch_size: 2
iters: 8
train_dataset:
  type: Dataset
  dataset_root: {root}
  train_path: {root}/train.txt
  num_classes: 4
  mode: train
  transforms:
    - type: Normalize
model:
  type: PFPNNet
  backbone:
    type: CycleMLP_B1_feat
    pretrained: {pretrained}
  backbone_indices: [0, 1, 2, 3]
  fpn_inplanes: [64, 128, 320, 512]
  channels: 64
  num_classes: 4
optimizer:
  type: AdamW
  weight_decay: 0.01
lr_scheduler:
  type: PolynomialDecay
  learning_rate: 0.001
  end_lr: 0
  power: 0.9
loss:
  types:
    - type: CrossEntropyLoss
  coef: [1]
'''


def test_paddleseg_pfpnnet_on_the_backbone_trains(tmp_path):
    """A PaddleSeg config with the backbone (ImageNet B1 weights from a file), a dataset of two
    64x96 images and their label maps on disk, PaddleSeg's optimizer and loss."""
    toolkit('paddleseg')
    import paddleseg_backbone  # noqa: F401
    import zoo
    from paddleseg.cvlibs import Config, SegBuilder
    from PIL import Image
    from conftest import photo_like_array
    from weights import write_weights
    paddle.seed(0)
    weights = str(tmp_path / 'imagenet.pdparams')
    write_weights(weights, zoo.numpy_state(zoo.create_model('CycleMLP_B1')))
    lines = []
    for index in range(2):
        Image.fromarray(photo_like_array(96, 64, index)).save(tmp_path / f'image{index}.png')
        label = np.zeros((64, 96), np.uint8)
        label[:, 48:] = 1
        label[32:] += 2 * index
        Image.fromarray(label).save(tmp_path / f'label{index}.png')
        lines.append(f'image{index}.png label{index}.png')
    (tmp_path / 'train.txt').write_text('\n'.join(lines) + '\n')
    config = tmp_path / 'pfpn.yml'
    config.write_text(PADDLESEG_CONFIG.format(root=tmp_path, pretrained=weights))
    builder = SegBuilder(Config(str(config)))
    model, dataset, optimizer, loss = builder.model, builder.train_dataset, builder.optimizer, builder.loss
    assert model.backbone.feat_channels == [64, 128, 320, 512]
    samples = [dataset[index] for index in range(2)]
    images = paddle.to_tensor(np.stack([sample['img'] for sample in samples]))
    labels = paddle.to_tensor(np.stack([sample['label'] for sample in samples]).astype('int64'))
    losses = []
    for _ in range(STEPS):
        logits = model(images)[0]                          # (B, classes, H, W)
        assert logits.shape == [2, 4, 64, 96]
        value = sum(coef * function(logits, labels) for function, coef in zip(loss['types'], loss['coef']))
        value.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(value))
    assert falling(losses), losses


PADDLEDET_CONFIG = '''
architecture: RetinaNet
RetinaNet:
  backbone: CycleMLPFeat
  neck: FPN
  head: RetinaHead
CycleMLPFeat:
  variant: CycleMLP_B1
  fork_last3: true
  return_idx: [1, 2, 3]
FPN:
  out_channel: 64
  spatial_scales: [0.125, 0.0625, 0.03125]
  extra_stage: 2
  has_extra_convs: true
  use_c5: false
RetinaHead:
  num_classes: 3
  conv_feat:
    name: RetinaFeat
    feat_in: 64
    feat_out: 64
    num_convs: 2
    norm_type: null
    use_dcn: false
  anchor_generator:
    name: RetinaAnchorGenerator
    octave_base_scale: 4
    scales_per_octave: 3
    aspect_ratios: [0.5, 1.0, 2.0]
    strides: [8.0, 16.0, 32.0, 64.0, 128.0]
  bbox_assigner:
    name: MaxIoUAssigner
    positive_overlap: 0.5
    negative_overlap: 0.4
    allow_low_quality: true
  loss_class:
    name: FocalLoss
    gamma: 2.0
    alpha: 0.25
    loss_weight: 1.0
  loss_bbox:
    name: SmoothL1Loss
    beta: 0.0
    loss_weight: 1.0
  nms:
    name: MultiClassNMS
    nms_top_k: 100
    keep_top_k: 10
    score_threshold: 0.05
    nms_threshold: 0.5
'''


def test_paddledetection_retinanet_on_the_backbone_trains(tmp_path):
    toolkit('ppdet')
    import paddledet_backbone  # noqa: F401
    from ppdet.core.workspace import create, load_config
    paddle.seed(0)
    config = tmp_path / 'retinanet.yml'
    config.write_text(PADDLEDET_CONFIG)
    cfg = load_config(str(config))
    model = create(cfg.architecture)
    assert [spec.stride for spec in model.backbone.out_shape] == [8, 16, 32]
    assert 'norm0' not in dict(model.backbone.body.named_sublayers()) or \
        type(model.backbone.body.norm0).__name__ == 'Identity'
    inputs = {'image': paddle.randn([2, 3, 128, 160]),
              'im_shape': paddle.to_tensor([[128., 160.]] * 2), 'scale_factor': paddle.ones([2, 2]),
              'gt_bbox': [paddle.to_tensor([[16., 16., 80., 96.]]), paddle.to_tensor([[40., 8., 150., 120.]])],
              'gt_class': [paddle.to_tensor([[1]]), paddle.to_tensor([[2]])]}
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=model.parameters())
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(inputs)['loss']
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert falling(losses), losses

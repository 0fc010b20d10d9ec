"""The dense-prediction configs under configs/ in the real toolkits, loaded as their users load
them: PaddleSeg 2.8 (Semantic FPN on ADE20K) and PaddleDetection 2.6 (RetinaNet and Mask R-CNN
on COCO). Each config file is read by the toolkit's own config loader with only the data paths
and the length (iterations or epochs, batch, image size) overridden, trains on a tiny dataset in
the toolkit's own format that the test writes, evaluates, and its loss must fall. Training
runs on the CPU at a small image size (the configs' 512x512 and 1333x800 would take minutes
a step on CI's two cores), and the official ImageNet weights a config names are replaced by a
locally written file of the same variant (CI has no internet); the name still reaches zoo.

The toolkits are not the repo's requirements: .ci/run installs them in its Paddle 2.6.2
environment (the era's pairing) and runs this file there with CYCLEMLP_TOOLKITS=required, which
turns a missing toolkit into a failure; elsewhere these tests are skipped."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

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
from PIL import Image  # noqa: E402

import download  # noqa: E402
import zoo  # noqa: E402
from conftest import REPO_ROOT, photo_like_array  # noqa: E402
from weights import write_weights  # noqa: E402

REQUIRED = os.environ.get('CYCLEMLP_TOOLKITS') == 'required'
CONFIGS = REPO_ROOT / 'configs'
VARIANTS = ['CycleMLP_B1', 'CycleMLP_B2', 'CycleMLP_B3', 'CycleMLP_B4', 'CycleMLP_B5']


def toolkit(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        if REQUIRED:
            raise
        pytest.skip(f'{module} is not installed (.ci/run tests it in its Paddle 2.6 environment)')


def falling(losses: list) -> bool:
    return len(losses) >= 2 and all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]


@pytest.fixture
def offline_b1_weights(tmp_path, monkeypatch):
    """Called once the toolkit is there: the official CycleMLP_B1 release replaced by a locally
    written ImageNet-layout file of B1 (fresh weights); returns the names asked for, and the file
    passes the same check as a download."""
    def install() -> list:
        path = str(tmp_path / 'CycleMLP_B1.pdparams')
        paddle.seed(0)
        write_weights(path, zoo.numpy_state(zoo.create_model('CycleMLP_B1')))
        asked = []

        def official_weights(name, check):
            asked.append(name)
            if name != 'CycleMLP_B1':
                raise AssertionError(f'only CycleMLP_B1 is written here, not {name}')
            check(path)
            return path
        monkeypatch.setattr(download, 'official_weights', official_weights)
        return asked
    return install


# ---------------------------------------------------------------- the detection adapter

@pytest.mark.parametrize('return_idx, fork_last3', [([1, 2, 3], True), ([1, 2, 3], False), ([0, 1, 2], False)],
                         ids=['retinanet', 'retinanet-without-fork_last3', 'first-three'])
def test_detection_backbone_builds_and_runs_only_what_it_returns(return_idx, fork_last3):
    """Every parameter gets a gradient (paddle.DataParallel with PaddleDetection's default
    find_unused_parameters=False requires it): the norms of stages not returned are identities
    and the stages after the last returned one are gone, so nothing unused is built."""
    toolkit('ppdet')
    from paddledet_backbone import CycleMLPFeat
    backbone = CycleMLPFeat('CycleMLP_B1', fork_last3=fork_last3, return_idx=return_idx)
    full, _ = zoo.create_backbone('CycleMLP_B1')
    maps = backbone({'image': paddle.randn([1, 3, 64, 96])})
    assert [m.shape[1] for m in maps] == [[64, 128, 320, 512][i] for i in return_idx]
    assert [m.shape[2:] for m in maps] == [[16 // 2 ** i, 24 // 2 ** i] for i in return_idx]   # strides 4 * 2^i
    sum((m * m).mean() for m in maps).backward()
    assert all(p.grad is not None for p in backbone.parameters())
    norms = sorted({name.split('.')[1] for name, _ in backbone.named_parameters() if name.startswith('body.norm')})
    assert norms == [f'norm{2 * i}' for i in return_idx]
    assert len(backbone.body.network) == 2 * return_idx[-1] + 1
    # The maps are the full backbone's, given the same weights.
    kept = backbone.body.state_dict()
    backbone.body.set_state_dict({key: value for key, value in full.state_dict().items() if key in kept})
    full.eval()
    backbone.eval()
    image = paddle.randn([1, 3, 64, 96])
    for got, want in zip(backbone({'image': image}), [full(image)[i] for i in return_idx]):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


def test_detection_backbone_arguments_are_checked():
    toolkit('ppdet')
    from paddledet_backbone import CycleMLPFeat
    for bad in ([], [3, 1], [1, 1, 2], [4]):
        with pytest.raises(ValueError, match='return_idx must be increasing stage indices'):
            CycleMLPFeat('CycleMLP_B1', return_idx=bad)
    with pytest.raises(ValueError, match='fork_last3 has no norm for stage 0'):
        CycleMLPFeat('CycleMLP_B1', fork_last3=True, return_idx=[0, 1, 2, 3])


# ---------------------------------------------------------------- PaddleSeg: Semantic FPN

def write_ade20k(root: Path, train: int = 4, val: int = 2, size=(96, 72)) -> None:
    """ADEChallengeData2016's layout: images/{training,validation}/*.jpg and annotations/
    {training,validation}/*.png, labels 0 (ignored) and 1..150 (classes 0..149 once shifted)."""
    width, height = size
    for split, count in (('training', train), ('validation', val)):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for index in range(count):
            name = f'ADE_{split}_{index:08d}'
            Image.fromarray(photo_like_array(width, height, index)).save(root / 'images' / split / f'{name}.jpg')
            label = np.ones((height, width), np.uint8)                   # class 0: the background
            label[:, width // 2:] = 2 + index % 2                        # classes 1 and 2
            label[:4] = 0                                                # ignored
            Image.fromarray(label).save(root / 'annotations' / split / f'{name}.png')


def paddleseg_config(path: Path, root: Path, iters: int, batch_size: int, crop: int):
    """The config file as PaddleSeg's tools/train.py reads it (--iters, --batch_size, --opts),
    with the image size of its transforms made small."""
    from paddleseg.cvlibs import Config
    cfg = Config(str(path), iters=iters, batch_size=batch_size,
                 opts=[f'train_dataset.dataset_root={root}', f'val_dataset.dataset_root={root}'])
    train_transforms = cfg.dic['train_dataset']['transforms']
    assert [t['type'] for t in train_transforms[:3]] == ['Resize', 'ResizeStepScaling', 'RandomPaddingCrop']
    train_transforms[0]['target_size'] = [4 * crop, crop]
    train_transforms[2]['crop_size'] = [crop, crop]
    val_resize = cfg.dic['val_dataset']['transforms'][0]
    assert val_resize['type'] == 'Resize'
    val_resize['target_size'] = [4 * crop, crop]
    return cfg


def test_paddleseg_semantic_fpn_b1_config_trains_and_evaluates(tmp_path, offline_b1_weights):
    """configs/paddleseg/semantic_fpn_cyclemlp_b1_*.yml through PaddleSeg's Config and SegBuilder
    (tools/train.py's steps), trained with the model, data, optimizer, schedule and losses they
    build, then evaluated at the original size through the val transforms: the loss falls.
    PaddleSeg 2.8.0's own train() fails on Paddle 2.6 at its first log line (it indexes the 0-D
    loss; fixed in PaddleSeg 2.9, which is not on PyPI), so its loop's steps are written out here."""
    toolkit('paddleseg')
    asked = offline_b1_weights()
    import paddleseg_backbone  # noqa: F401
    from paddleseg.core.infer import inference
    from paddleseg.core.train import loss_computation
    from paddleseg.cvlibs import SegBuilder
    root = tmp_path / 'ADEChallengeData2016'
    write_ade20k(root)
    cfg = paddleseg_config(CONFIGS / 'paddleseg' / 'semantic_fpn_cyclemlp_b1_ade20k_512x512_40k.yml',
                           root, iters=12, batch_size=4, crop=64)
    builder = SegBuilder(cfg)
    paddle.seed(0)
    np.random.seed(0)
    model = builder.model
    assert asked == ['CycleMLP_B1']
    assert type(model).__name__ == 'PFPNNet' and model.backbone.config['layers'] == [2, 2, 4, 2]
    samples = [builder.train_dataset[index] for index in range(4)]
    assert all(sample['img'].shape == (3, 64, 64) and sample['label'].shape == (64, 64) for sample in samples)
    assert len(builder.val_dataset) == 2
    optimizer, losses_cfg = builder.optimizer, builder.loss
    assert type(optimizer).__name__ == 'AdamW' and optimizer._weight_decay == pytest.approx(1e-4)
    schedule = optimizer._learning_rate
    assert type(schedule).__name__ == 'PolynomialDecay' and schedule.base_lr == pytest.approx(2e-4)
    loader = paddle.io.DataLoader(builder.train_dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    model.train()
    losses = []
    while len(losses) < cfg.iters:
        for batch in loader:
            logits = model(batch['img'])
            loss = sum(loss_computation(logits, batch['label'].astype('int64'), None, losses_cfg))
            loss.backward()
            optimizer.step()
            schedule.step()
            model.clear_gradients()
            losses.append(float(loss))
    assert falling(losses), losses
    # PaddleSeg's evaluate() (its calculate_area concatenates 0-D sums) fails on Paddle 2.6 as
    # train() does: its inference, with the val transforms undone, and the IoU counted here.
    model.eval()
    intersection, union = np.zeros(150), np.zeros(150)
    with paddle.no_grad():
        for index in range(len(builder.val_dataset)):
            sample = builder.val_dataset[index]
            prediction, _ = inference(model, paddle.to_tensor(sample['img'][None]),
                                      trans_info=sample['trans_info'], **cfg.test_config)
            label = sample['label'][0].astype(np.int64)
            assert prediction.shape == [1, 1, *label.shape]       # the original size, 72x96
            prediction, valid = prediction.numpy()[0, 0], label != 255
            for category in range(150):
                predicted, labelled = (prediction == category) & valid, (label == category) & valid
                intersection[category] += (predicted & labelled).sum()
                union[category] += (predicted | labelled).sum()
    mean_iou = np.mean(intersection[union > 0] / union[union > 0])
    assert 0 < mean_iou <= 1, (intersection, union)


@pytest.mark.parametrize('variant', VARIANTS[1:])
def test_paddleseg_semantic_fpn_configs_of_the_other_variants(variant, tmp_path):
    """B2..B5: the B1 config with their backbone and its widths; each builds and runs a step."""
    toolkit('paddleseg')
    import paddleseg_backbone  # noqa: F401
    from paddleseg.cvlibs import SegBuilder
    root = tmp_path / 'ADEChallengeData2016'
    write_ade20k(root, train=1, val=1)
    path = CONFIGS / 'paddleseg' / f'semantic_fpn_cyclemlp_{variant[-2:].lower()}_ade20k_512x512_40k.yml'
    cfg = paddleseg_config(path, root, iters=1, batch_size=1, crop=64)
    backbone_cfg = cfg.dic['model']['backbone']
    assert (backbone_cfg['type'], backbone_cfg['pretrained']) == (f'{variant}_feat', variant)
    backbone_cfg['pretrained'] = None                # B2..B5 weights are not written here
    builder = SegBuilder(cfg)
    model = builder.model
    assert model.backbone.config['layers'] == zoo.ARCHITECTURES[variant]['layers']
    sample = builder.train_dataset[0]
    logits = model(paddle.to_tensor(sample['img'][None]))[0]
    assert logits.shape == [1, 150, 64, 64]
    loss = builder.loss['types'][0](logits, paddle.to_tensor(sample['label'][None].astype('int64')))
    loss.backward()
    builder.optimizer.step()
    assert np.isfinite(float(loss))


# ---------------------------------------------------------------- PaddleDetection: RetinaNet, Mask R-CNN

def write_coco(root: Path, split: str, count: int, size=(128, 96)) -> None:
    """COCO 2017's layout: <split>/*.jpg and annotations/instances_<split>.json, 80 categories,
    one or two boxes an image (of two categories), each with a polygon mask."""
    width, height = size
    (root / split).mkdir(parents=True)
    (root / 'annotations').mkdir(exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        pixels = photo_like_array(width, height, 100 + index)
        boxes = [(8 + 4 * index, 10, 56, 48, 1), (70, 30 + 2 * index, 48, 56, 2)][:1 + index % 2 + (index == 0)]
        for x, y, w, h, category in boxes:
            pixels[y:y + h, x:x + w] = (230, 40, 40) if category == 1 else (40, 40, 230)
            annotations.append({'id': len(annotations) + 1, 'image_id': index + 1, 'category_id': category,
                                'bbox': [x, y, w, h], 'area': w * h, 'iscrowd': 0,
                                'segmentation': [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        name = f'{index:012d}.jpg'
        Image.fromarray(pixels).save(root / split / name)
        images.append({'id': index + 1, 'file_name': name, 'width': width, 'height': height})
    # COCO's 80 categories (the configs' num_classes), of which the boxes use the first two.
    categories = [{'id': index, 'name': f'category{index}', 'supercategory': 'thing'} for index in range(1, 81)]
    with open(root / 'annotations' / f'instances_{split}.json', 'w') as file:
        json.dump({'images': images, 'annotations': annotations, 'categories': categories}, file)


def paddledet_config(path: Path, root: Path, epochs: int, batch_size: int, size):
    """The config file as PaddleDetection's tools/train.py reads it (-c, -o), with the data
    paths, the length (epochs, batch, the 500 warmup iterations), the device (CPU, no loader
    workers) and the image size overridden."""
    from ppdet.core.workspace import load_config, merge_config
    cfg = load_config(str(path))
    merge_config({'use_gpu': False, 'epoch': epochs, 'worker_num': 0, 'log_iter': 1,
                  'TrainDataset': {'dataset_dir': str(root), 'image_dir': 'train2017',
                                   'anno_path': 'annotations/instances_train2017.json'},
                  'EvalDataset': {'dataset_dir': str(root), 'image_dir': 'val2017',
                                  'anno_path': 'annotations/instances_val2017.json'},
                  'TestDataset': {'dataset_dir': str(root), 'anno_path': 'annotations/instances_val2017.json'},
                  'TrainReader': {'batch_size': batch_size}})
    warmup = cfg.LearningRate['schedulers'][1]
    assert type(warmup).__name__ == 'LinearWarmup' and warmup.steps == 500
    warmup.steps = 1                   # 500 iterations of warmup are longer than this whole run
    for reader in ('TrainReader', 'EvalReader', 'TestReader'):
        resize = cfg[reader]['sample_transforms'][1]
        assert list(resize) == ['Resize'] and resize['Resize']['target_size'] == [800, 1333]
        resize['Resize']['target_size'] = list(size)
    return cfg


def train_paddledet(cfg, output: Path):
    """PaddleDetection's tools/train.py steps (Trainer, train with --eval), recording the loss of
    every step and the number of images evaluated."""
    from ppdet.engine import Trainer
    from ppdet.engine.callbacks import Callback
    losses, evaluated = [], []

    class Record(Callback):
        def on_step_end(self, status):
            if status['mode'] == 'train':
                losses.append(float(status['training_staus'].meters['loss'].value))
            else:
                evaluated.append(status['step_id'])
    paddle.seed(0)
    np.random.seed(0)
    trainer = Trainer(cfg, mode='train')
    trainer.register_callbacks([Record(trainer.model)])
    os.makedirs(output, exist_ok=True)
    trainer.train(validate=True)
    return trainer, losses, evaluated


# PaddleDetection 2.6.0's RPN concatenates the 0-D tensors paddle.shape(...)[0] is on Paddle 2.6
# (ppdet/modeling/proposal_generator/rpn_head.py), so no Faster or Mask R-CNN trains or predicts
# with it there; fixed in PaddleDetection 2.7.0 (its commit 4ee5e38), which is not on PyPI. Strict:
# when the installed toolkit trains it, this test fails until the mark goes.
RPN_ON_PADDLE_26 = pytest.mark.xfail(raises=ValueError, strict=True,
                                     reason="PaddleDetection 2.6.0's RPN fails on Paddle 2.6's 0-D shapes")


@pytest.mark.parametrize('architecture', ['retinanet', pytest.param('mask_rcnn', marks=RPN_ON_PADDLE_26)])
def test_paddledet_b1_config_trains_and_evaluates(architecture, tmp_path, monkeypatch, offline_b1_weights):
    """configs/paddledet/<architecture>_cyclemlp_b1_fpn_1x_coco.yml through PaddleDetection's
    load_config and Trainer, trained with evaluation on a COCO-style dataset: the loss falls,
    COCO evaluation runs over every validation image, and the saved model predicts."""
    toolkit('ppdet')
    asked = offline_b1_weights()
    import paddledet_backbone  # noqa: F401
    root = tmp_path / 'coco'
    write_coco(root, 'train2017', 2)
    write_coco(root, 'val2017', 2)
    monkeypatch.chdir(tmp_path)                   # the config's save_dir and COCO's result files
    cfg = paddledet_config(CONFIGS / 'paddledet' / f'{architecture}_cyclemlp_b1_fpn_1x_coco.yml', root,
                           epochs=8, batch_size=2, size=(96, 128))
    trainer, losses, evaluated = train_paddledet(cfg, tmp_path / 'output')
    assert asked == ['CycleMLP_B1']
    backbone = trainer.model.backbone
    assert type(backbone).__name__ == 'CycleMLPFeat' and backbone.return_idx == cfg.CycleMLPFeat['return_idx']
    assert type(trainer.optimizer).__name__ == 'AdamW'
    assert len(losses) == 8 and falling(losses), losses
    assert len(evaluated) == 8 * 2, evaluated        # every epoch (snapshot_epoch 1), both images
    # tools/infer.py's steps: the config's weights (where training saved them), its TestDataset
    # (the class names) and TestReader.
    from ppdet.engine import Trainer
    assert cfg.weights == f'output/{architecture}_cyclemlp_b1_fpn_1x_coco/model_final'
    predictor = Trainer(cfg, mode='test')
    predictor.load_weights(cfg.weights)
    [result] = predictor.predict([str(root / 'val2017' / f'{0:012d}.jpg')], output_dir=str(tmp_path / 'infer'),
                                 visualize=False)
    assert result['bbox'].shape[1] == 6 and int(result['bbox_num'][0]) == len(result['bbox'])
    assert np.isfinite(result['bbox']).all()


@pytest.mark.parametrize('architecture', ['retinanet', 'mask_rcnn'])
@pytest.mark.parametrize('variant', VARIANTS[1:])
def test_paddledet_configs_of_the_other_variants(architecture, variant):
    """B2..B5: the B1 config with their backbone; each builds with the neck fitted to its widths."""
    toolkit('ppdet')
    import paddledet_backbone  # noqa: F401
    from ppdet.core.workspace import create, load_config, merge_config
    name = f'{architecture}_cyclemlp_{variant[-2:].lower()}_fpn_1x_coco'
    cfg = load_config(str(CONFIGS / 'paddledet' / f'{name}.yml'))
    assert (cfg.CycleMLPFeat['variant'], cfg.CycleMLPFeat['pretrained']) == (variant, variant)
    assert cfg.weights == f'output/{name}/model_final'
    merge_config({'CycleMLPFeat': {'pretrained': None}})    # B2..B5 weights are not written here
    model = create(cfg.architecture)
    widths = zoo.ARCHITECTURES[variant]['embed_dims']
    assert [spec.channels for spec in model.backbone.out_shape] == [widths[i] for i in cfg.CycleMLPFeat['return_idx']]
    assert model.backbone.body.config['layers'] == zoo.ARCHITECTURES[variant]['layers']


# ---------------------------------------------------------------- the launcher

def test_launcher_registers_the_backbones_and_runs_the_script_as_main(tmp_path):
    """configs/launch.py runs a toolkit's script as `python script args` would, with both
    adapters imported first (a stand-in for tools/train.py reads the registries)."""
    toolkit('paddleseg')
    toolkit('ppdet')
    tools = tmp_path / 'Toolkit' / 'tools'
    tools.mkdir(parents=True)
    (tools / 'train.py').write_text(
        'import sys\n'
        'from paddleseg.cvlibs import manager\n'
        'from ppdet.core.workspace import global_config\n'
        'assert __name__ == "__main__"\n'
        'print("argv", sys.argv)\n'
        'print("seg", "CycleMLP_B5_feat" in manager.BACKBONES.components_dict)\n'
        'print("det", "CycleMLPFeat" in global_config)\n')
    result = subprocess.run([sys.executable, str(CONFIGS / 'launch.py'), str(tools / 'train.py'), '-c', 'x.yml'],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"argv ['{tools / 'train.py'}', '-c', 'x.yml']" in result.stdout
    assert 'seg True' in result.stdout and 'det True' in result.stdout
    missing = subprocess.run([sys.executable, str(CONFIGS / 'launch.py')], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and 'usage: python configs/launch.py' in missing.stderr

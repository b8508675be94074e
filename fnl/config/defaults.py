"""Every config key and its default. Key names follow detectron2 (and DensePose's ROI_DENSEPOSE_HEAD)."""

from fnl.config.config import CfgNode

# Keys an older fnl had and nothing reads any more: configs stored in its checkpoints and exports carry them, and
# fnl.config.stored_config drops them (a config file that sets one is an error naming it, like any unknown key).
RETIRED_KEYS = ("VERSION", "MODEL.ROI_BOX_HEAD.NORM", "TEST.EVAL_PERIOD")

_C = CfgNode()
_C.OUTPUT_DIR = "./output"
_C.SEED = 0

_C.MODEL = CfgNode()
_C.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
_C.MODEL.DEVICE = "cpu"
_C.MODEL.WEIGHTS = ""
_C.MODEL.DENSEPOSE_ON = True
# RGB order, ImageNet statistics in 0..255 as timm's backbones were trained with.
_C.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
_C.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]

_C.MODEL.BACKBONE = CfgNode()
_C.MODEL.BACKBONE.NAME = "spnasnet_100"  # any timm model that supports features_only
_C.MODEL.BACKBONE.PRETRAINED = False
# "bottleneck": block outputs; "expansion": inputs of conv_pwl, taken by timm's forward pre-hooks (BiFPN).
_C.MODEL.BACKBONE.FEATURE_LOCATION = "bottleneck"
_C.MODEL.BACKBONE.OUT_INDICES = [1, 2, 3, 4]  # timm feature indices of C2..C5 (strides 4..32)
# Freeze the stem (1) and the first N-1 stages, as the paper's code freezes at 2.
_C.MODEL.BACKBONE.FREEZE_AT = 2
_C.MODEL.BACKBONE.NORM = "BN"  # "BN" | "SyncBN" | "FrozenBN"

_C.MODEL.NECK = CfgNode()
_C.MODEL.NECK.NAME = "FPN"  # "FPN" | "BiFPN"
_C.MODEL.NECK.OUT_CHANNELS = 256
_C.MODEL.NECK.NORM = ""  # FPN: "" | "BN" | "SyncBN"; BiFPN always uses BN after its separable convs
_C.MODEL.NECK.NUM_REPEATS = 3  # BiFPN layers
_C.MODEL.NECK.FUSE_EPS = 1e-4  # fast normalized fusion epsilon
# "fnl" | "densepose-fnl": the BiFPN of DensePoseFnL's released model B, for its checkpoints (fnl.modeling.necks)
_C.MODEL.NECK.BIFPN_LAYOUT = "fnl"

_C.MODEL.ANCHOR_GENERATOR = CfgNode()
_C.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
_C.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
_C.MODEL.ANCHOR_GENERATOR.OFFSET = 0.0

_C.MODEL.RPN = CfgNode()
_C.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
_C.MODEL.RPN.IOU_THRESHOLDS = [0.3, 0.7]
_C.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
_C.MODEL.RPN.POSITIVE_FRACTION = 0.5
_C.MODEL.RPN.BBOX_REG_WEIGHTS = [1.0, 1.0, 1.0, 1.0]
_C.MODEL.RPN.SMOOTH_L1_BETA = 0.0
_C.MODEL.RPN.LOSS_WEIGHT = 1.0
_C.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 2000  # per level
_C.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000  # per level
_C.MODEL.RPN.POST_NMS_TOPK_TRAIN = 1000  # per level, after NMS
_C.MODEL.RPN.POST_NMS_TOPK_TEST = 1000  # per level, after NMS; the paper's "test-tuned" setting is 100
_C.MODEL.RPN.NMS_THRESH = 0.7
_C.MODEL.RPN.NMS_THRESH_TEST = 0.7  # the paper's "test-tuned" setting is 0.3
# What POST_NMS_TOPK_* count: "level" (fnl's models: the top-k of each level) | "image" (detectron2's RPN: the
# top-k over all levels of an image; its DensePose model zoo was trained and evaluated so).
_C.MODEL.RPN.POST_NMS_TOPK_PER = "level"

_C.MODEL.ROI_HEADS = CfgNode()
_C.MODEL.ROI_HEADS.NUM_CLASSES = 1  # person
_C.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
_C.MODEL.ROI_HEADS.IOU_THRESHOLDS = [0.5]
_C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
_C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
_C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
_C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
_C.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE = 100
_C.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = True

_C.MODEL.ROI_BOX_HEAD = CfgNode()
_C.MODEL.ROI_BOX_HEAD.NUM_CONV = 2
_C.MODEL.ROI_BOX_HEAD.CONV_DIM = 256
_C.MODEL.ROI_BOX_HEAD.NUM_FC = 0
_C.MODEL.ROI_BOX_HEAD.FC_DIM = 1024
_C.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
_C.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 2
_C.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"  # aligned RoIAlign; "ROIAlign" = legacy half-pixel-off
_C.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = [10.0, 10.0, 5.0, 5.0]
_C.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0

_C.MODEL.ROI_DENSEPOSE_HEAD = CfgNode()
_C.MODEL.ROI_DENSEPOSE_HEAD.NAME = "DensePoseDeepLabHead"  # ASPP + convs ("DensePoseV1ConvXHead": convs only)
_C.MODEL.ROI_DENSEPOSE_HEAD.IN_FEATURES = ["p2"]
_C.MODEL.ROI_DENSEPOSE_HEAD.POOLER_RESOLUTION = 32
_C.MODEL.ROI_DENSEPOSE_HEAD.POOLER_SAMPLING_RATIO = 2
_C.MODEL.ROI_DENSEPOSE_HEAD.POOLER_TYPE = "ROIAlignV2"
_C.MODEL.ROI_DENSEPOSE_HEAD.NUM_STACKED_CONVS = 4
_C.MODEL.ROI_DENSEPOSE_HEAD.CONV_HEAD_DIM = 256
_C.MODEL.ROI_DENSEPOSE_HEAD.CONV_HEAD_KERNEL = 3
_C.MODEL.ROI_DENSEPOSE_HEAD.ASPP_DILATIONS = [6, 12, 56]  # detectron2 DensePoseDeepLabHead
_C.MODEL.ROI_DENSEPOSE_HEAD.NONLOCAL_ON = False
# Norm after the head's convs: "" (none) | "BN" (folds into the convs for int8). detectron2's DeepLab head uses GN,
# which cannot be folded; without any norm, SGD cannot train the head from scratch (see docs/DENSEPOSE_TRAINING.md).
_C.MODEL.ROI_DENSEPOSE_HEAD.NORM = ""
_C.MODEL.ROI_DENSEPOSE_HEAD.NUM_PATCHES = 24
_C.MODEL.ROI_DENSEPOSE_HEAD.NUM_COARSE_SEGM_CHANNELS = 2  # 2: foreground/background; 15: 14 parts + background
_C.MODEL.ROI_DENSEPOSE_HEAD.DECONV_KERNEL = 4
_C.MODEL.ROI_DENSEPOSE_HEAD.UP_SCALE = 1  # predictor output = 2 * POOLER_RESOLUTION * UP_SCALE = HEATMAP_SIZE
_C.MODEL.ROI_DENSEPOSE_HEAD.HEATMAP_SIZE = 64
_C.MODEL.ROI_DENSEPOSE_HEAD.FG_IOU_THRESHOLD = 0.7
_C.MODEL.ROI_DENSEPOSE_HEAD.BATCH_SIZE_PER_IMAGE = 32  # RoIs per image that train the DensePose head
_C.MODEL.ROI_DENSEPOSE_HEAD.POINT_REGRESSION_WEIGHTS = 0.01
_C.MODEL.ROI_DENSEPOSE_HEAD.PART_WEIGHTS = 1.0
_C.MODEL.ROI_DENSEPOSE_HEAD.INDEX_WEIGHTS = 5.0  # weight of the coarse segmentation loss, as in detectron2
# detectron2 DensePose's decoder: P2..P5 (IN_FEATURES) fused into one map at DECODER_COMMON_STRIDE before pooling.
# Off by default (detectron2's default is on): the paper's models have none; its R_50_FPN_s1x model zoo entries do.
_C.MODEL.ROI_DENSEPOSE_HEAD.DECODER_ON = False
_C.MODEL.ROI_DENSEPOSE_HEAD.DECODER_NUM_CLASSES = 256  # output channels (the DensePose head's input)
_C.MODEL.ROI_DENSEPOSE_HEAD.DECODER_CONV_DIMS = 256
_C.MODEL.ROI_DENSEPOSE_HEAD.DECODER_NORM = ""  # "" | "BN"
_C.MODEL.ROI_DENSEPOSE_HEAD.DECODER_COMMON_STRIDE = 4

# detectron2's ResNet (fnl.modeling.resnet), used when MODEL.BACKBONE.NAME is "build_resnet_backbone" or
# "build_resnet_fpn_backbone" as in detectron2's configs; the timm backbones ignore this section. Defaults are
# detectron2's except OUT_FEATURES: fnl builds FPN models only, which take res2..res5.
_C.MODEL.RESNETS = CfgNode()
_C.MODEL.RESNETS.DEPTH = 50  # 50 | 101 | 152
_C.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
_C.MODEL.RESNETS.NUM_GROUPS = 1  # > 1: ResNeXt
_C.MODEL.RESNETS.NORM = "FrozenBN"  # "FrozenBN" | "BN" | "SyncBN"
_C.MODEL.RESNETS.WIDTH_PER_GROUP = 64
# True for MSRA's (detectron2's ImageNet) weights: a stage's stride in its first 1x1 conv; False: in the 3x3 conv.
_C.MODEL.RESNETS.STRIDE_IN_1X1 = True
_C.MODEL.RESNETS.RES5_DILATION = 1  # 1 | 2 (res5 then keeps stride 16)
_C.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
_C.MODEL.RESNETS.STEM_OUT_CHANNELS = 64

_C.INPUT = CfgNode()
_C.INPUT.FORMAT = "RGB"
_C.INPUT.MIN_SIZE_TRAIN = [640, 672, 704, 736, 768, 800]
_C.INPUT.MAX_SIZE_TRAIN = 1333
_C.INPUT.MIN_SIZE_TEST = 800
_C.INPUT.MAX_SIZE_TEST = 1333
_C.INPUT.RANDOM_FLIP = "horizontal"  # "horizontal" | "none"
_C.INPUT.SIZE_DIVISIBILITY = 32

_C.DATASETS = CfgNode()
# A dataset root holds annotations/densepose_<split>.json, images/<split>/ and surface/ (see fnl.data.catalog).
_C.DATASETS.ROOT = "data/synth"
_C.DATASETS.TRAIN = ["train"]
_C.DATASETS.TEST = ["val"]

_C.DATALOADER = CfgNode()
_C.DATALOADER.NUM_WORKERS = 0
_C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True

_C.SOLVER = CfgNode()
_C.SOLVER.IMS_PER_BATCH = 16
# "SGD" (momentum; detectron2's default) | "AdamW" (MOMENTUM unused): from-scratch training on few CPU iterations
# converges far faster with AdamW (docs/DENSEPOSE_TRAINING.md).
_C.SOLVER.OPTIMIZER = "SGD"
_C.SOLVER.BASE_LR = 0.002
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.WEIGHT_DECAY = 0.0001
_C.SOLVER.WEIGHT_DECAY_NORM = 0.0
_C.SOLVER.MAX_ITER = 130000
_C.SOLVER.STEPS = [100000, 120000]
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.WARMUP_ITERS = 1000
_C.SOLVER.WARMUP_FACTOR = 0.001
_C.SOLVER.CHECKPOINT_PERIOD = 5000
_C.SOLVER.CLIP_GRADIENTS = 0.0  # max L2 norm; 0 disables
# Periodic checkpoints kept on disk, the newest (0: all). At least 2: a diverging run resumes from the one before last.
_C.SOLVER.CHECKPOINTS_KEPT = 3

_C.TEST = CfgNode()
_C.TEST.MAX_IMAGES = 0  # 0: the whole split

_C.QUANTIZATION = CfgNode()
# "fbgemm" (x86 servers/desktops) | "x86" | "qnnpack" (mobile ARM). The DensePose predictor is int8 on each: its
# transposed convs become sub-pixel convs (torch 2.14's quantized ConvTranspose2d is wrong on x86 and qnnpack).
_C.QUANTIZATION.BACKEND = "fbgemm"
_C.QUANTIZATION.MODE = "qat"  # "qat": quantization-aware training | "ptq": calibration only
# "per-channel" int8 weights (fbgemm, XNNPACK) | "per-tensor": one scale per layer, what stock Caffe2's Int8 ops and
# QNNPACK compute; quantize with it when the target is fnl-export --format caffe2, so QAT trains what the device runs.
_C.QUANTIZATION.WEIGHT_SCALES = "per-channel"
# Modules (qualified names) kept in float on top of the islands every model has (RPN decoding, RoI pooling,
# predictor outputs): their inputs are dequantized and their outputs quantized again.
_C.QUANTIZATION.FLOAT_MODULES = []
_C.QUANTIZATION.MAX_ITER = 300  # QAT iterations (starting from the float checkpoint)
_C.QUANTIZATION.BASE_LR = 0.0005  # QAT learning rate: small, the weights are already trained
_C.QUANTIZATION.WARMUP_ITERS = 0
# Freeze BN statistics after this many QAT iterations. 0: BN keeps the float model's statistics throughout, which
# measured better on both models tried: re-estimating them from QAT batches of a few images cost model B 0.47
# DensePose AP more than freezing them from the start, and the AP gate's small model 5.1 (docs/DENSEPOSE_TRAINING.md).
_C.QUANTIZATION.FREEZE_BN_ITER = 0
_C.QUANTIZATION.FREEZE_OBSERVER_ITER = 250  # freeze quantization ranges after this many QAT iterations
_C.QUANTIZATION.CALIBRATION_IMAGES = 32  # images the observers see before QAT (and all that PTQ sees)
_C.QUANTIZATION.CHECKPOINT_PERIOD = 100
# QAT's SOLVER.CHECKPOINTS_KEPT: periodic QAT checkpoints kept, the newest (0: all; else at least 2).
_C.QUANTIZATION.CHECKPOINTS_KEPT = 3

"""Architectures nobody here wrote: transformers, timm and torchvision models vs torch autograd (issue 13).

Each architecture is built from a config written below with seeded random weights at a small
size (nothing downloads: configs in code, ``pretrained=False``), put in eval mode (Dropout and
BatchNorm deterministic), wrapped so that it has one float output, and exported with both torch
exporters: TorchScript (``dynamo=False``, ``do_constant_folding=False``, ``TrainingMode.PRESERVE``)
and dynamo (``dynamo=True``, ``optimize=False``), with static shapes (a few also with a symbolic
batch: ``test_architecture_dynamic_batch_vs_torch``).  onnxbp differentiates every
parameter (``wrt=None``) plus the float input (``pixel_values``, ``input_features``; the text models
take int64 token ids, which have no gradient), onnxruntime runs the gradient model on a random
input and a random upstream gradient ``u``, and torch computes ``y.backward(u)`` on the same module.
Every torch parameter with a gradient must be matched to an ONNX initializer
(``models.zoo.export.param_map``: by name, else by value, also transposed); constant-initialised
tensors (zero biases, LayerNorm ones) are perturbed first so that the TorchScript exporter does not
merge equal initializers (``build_transformers._distinct``).  Each gradient must agree with torch in
the normwise relative error ``max|ours - torch| / max(max|torch|, 1e-3 G)`` (``G`` the largest
gradient entry of the network) within ``RTOL = 1e-4``, float32.  Every gradient model passes
``onnx.checker`` with ``full_check`` (``assert_standard``).

The default run takes a few fast architectures with one exporter; everything else is
``@pytest.mark.slow``.  The results table is in docs/networks.md ("Architectures from transformers
and timm").
"""

from __future__ import annotations

import io
import os
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "models"))

import onnx  # noqa: E402
from gradutil import _record, assert_close, assert_standard, import_torchvision, session  # noqa: E402

import onnxbp  # noqa: E402
from build_transformers import _distinct  # noqa: E402
from models.zoo.export import param_map  # noqa: E402
from onnxbp.checker import gradient_names  # noqa: E402

RTOL = 1e-4
OUT = "out"
BATCH = 2


_torchvision = import_torchvision()  # conftest did it already under pytest; run as a script, not


def _timm():
    """timm, or a skip with the reason (torchvision missing or unimportable)."""
    try:
        import timm
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"timm unavailable: {type(e).__name__}: {str(e).splitlines()[0]}")
    return timm


class _One(torch.nn.Module):
    """The model with one float output: ``pick(model(**inputs))``."""

    def __init__(self, m, names, pick):
        super().__init__()
        self.m, self.names, self.pick = m, names, pick

    def forward(self, *args):
        return self.pick(self.m(**dict(zip(self.names, args))))


def _hidden(o):
    return o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0]


def _logits(o):
    return o.logits


def _ids(vocab, t=8):
    """Token ids 1..vocab-1: id 0 is the models' ``padding_idx``, whose embedding row torch's
    backward leaves at zero (``nn.Embedding(padding_idx=0)``) while the exported Gather knows nothing
    of it; with no 0 in the input both sides agree that row gets no gradient."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, vocab, (BATCH, t), generator=g)


def _img(c=3, h=32, w=None):
    g = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, c, h, w or h, generator=g)


EAGER = {"attn_implementation": "eager"}


# ----------------------------------------------------------------------------- architectures
def bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **EAGER)
    m = transformers.BertForSequenceClassification(cfg)
    ids = _ids(64)
    return m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, _logits


def distilbert():
    cfg = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                        max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, **EAGER)
    m = transformers.DistilBertModel(cfg)
    ids = _ids(64)
    return m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, _hidden


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, **EAGER)
    ids = _ids(64)  # with the mask: without one the TorchScript export meets aten::diff (no symbolic)
    return transformers.GPT2Model(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, _hidden


def t5_encoder():
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                dropout_rate=0.0, use_cache=False, **EAGER)
    return transformers.T5EncoderModel(cfg), {"input_ids": _ids(64)}, _hidden


def vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, num_labels=5, **EAGER)
    return transformers.ViTForImageClassification(cfg), {"pixel_values": _img()}, _logits


def deit():
    cfg = transformers.DeiTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=5, **EAGER)
    return transformers.DeiTForImageClassificationWithTeacher(cfg), {"pixel_values": _img()}, _logits


def clip_vision():
    cfg = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, projection_dim=16, **EAGER)
    return transformers.CLIPVisionModelWithProjection(cfg), {"pixel_values": _img()}, lambda o: o.image_embeds


def whisper_encoder():
    cfg = transformers.WhisperConfig(vocab_size=64, num_mel_bins=8, encoder_layers=2, encoder_attention_heads=2,
                                     decoder_layers=1, decoder_attention_heads=2, d_model=32, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_source_positions=8, max_target_positions=8,
                                     pad_token_id=1, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **EAGER)
    enc = transformers.WhisperForConditionalGeneration(cfg).model.encoder
    g = torch.Generator().manual_seed(3)
    return enc, {"input_features": torch.randn(BATCH, 8, 16, generator=g)}, _hidden


def segformer():
    cfg = transformers.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                       hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
                                       num_attention_heads=[1, 2], mlp_ratios=[2, 2], hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
                                       drop_path_rate=0.0, num_labels=5)
    return transformers.SegformerForImageClassification(cfg), {"pixel_values": _img()}, _logits


def convnext():
    cfg = transformers.ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16],
                                      depths=[1, 1], drop_path_rate=0.0, num_labels=5)
    return transformers.ConvNextForImageClassification(cfg), {"pixel_values": _img()}, _logits


def swin():
    cfg = transformers.SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=8, depths=[2, 1],
                                  num_heads=[1, 2], window_size=4, mlp_ratio=2.0, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=5, **EAGER)
    return transformers.SwinForImageClassification(cfg), {"pixel_values": _img()}, _logits


def resnet():
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="bottleneck", downsample_in_first_stage=True, num_labels=5)
    return transformers.ResNetForImageClassification(cfg), {"pixel_values": _img()}, _logits


def regnet():
    cfg = transformers.RegNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    groups_width=4, layer_type="y", num_labels=5)
    return transformers.RegNetForImageClassification(cfg), {"pixel_values": _img()}, _logits


def mobilenet_v2():
    cfg = transformers.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25, min_depth=4,
                                         classifier_dropout_prob=0.0, num_labels=5)
    return transformers.MobileNetV2ForImageClassification(cfg), {"pixel_values": _img()}, _logits


def efficientnet():
    cfg = transformers.EfficientNetConfig(num_channels=3, image_size=32, width_coefficient=0.25,
                                          depth_coefficient=0.2, hidden_dim=320, dropout_rate=0.0,
                                          drop_connect_rate=0.0, num_labels=5)
    return transformers.EfficientNetForImageClassification(cfg), {"pixel_values": _img()}, _logits


def poolformer():
    cfg = transformers.PoolFormerConfig(num_channels=3, patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1],
                                        num_encoder_blocks=2,
                                        depths=[1, 1], hidden_sizes=[8, 16], mlp_ratio=2.0, drop_path_rate=0.0,
                                        hidden_dropout_prob=0.0, num_labels=5)
    return transformers.PoolFormerForImageClassification(cfg), {"pixel_values": _img()}, _logits


def levit():
    cfg = transformers.LevitConfig(image_size=64, num_channels=3, patch_size=16, hidden_sizes=[16, 24, 32],
                                   num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8],
                                   drop_path_rate=0, mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2], num_labels=5)
    return transformers.LevitForImageClassification(cfg), {"pixel_values": _img(h=64)}, _logits


def tv_vit():
    """torchvision's VisionTransformer (nn.MultiheadAttention: TorchScript writes its packed q/k/v
    ``unflatten`` with a ``Mod``-normalised dim, which the shape folding used to skip)."""
    if _torchvision is None:
        pytest.skip("torchvision unavailable")
    m = _torchvision.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)
    return m, {"x": _img()}, lambda o: o


def detr():
    """DETR with a small transformers ResNet backbone (stride 16: a 2x2 feature map), no downloads."""
    backbone = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 32],
                                         depths=[1, 1, 1], layer_type="basic", out_features=["stage3"])
    cfg = transformers.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                  d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=4,
                                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, num_labels=5)
    return transformers.DetrForObjectDetection(cfg), {"pixel_values": _img()}, _logits


def timm_model(name, size=32, **kw):
    def build():
        timm = _timm()
        return timm.create_model(name, pretrained=False, num_classes=5, **kw), {"x": _img(h=size)}, lambda o: o
    build.__name__ = name
    return build


ARCHS = {f.__name__: f for f in (bert, distilbert, gpt2, t5_encoder, vit, deit, clip_vision, whisper_encoder,
                                  segformer, convnext, swin, resnet, regnet, mobilenet_v2, efficientnet,
                                  poolformer, levit, tv_vit, detr)}
TIMM = {"timm_" + name: timm_model(name, size, **kw) for name, size, kw in (
    ("resnet18", 32, {}),
    ("resnet50d", 32, {}),
    ("efficientnet_b0", 32, {}),
    ("mobilenetv3_small_100", 32, {}),
    ("regnetx_002", 32, {}),
    ("densenet121", 32, {}),
    ("deit_tiny_patch16_224", 32, {"img_size": 32, "patch_size": 8, "depth": 2}),
    ("mixer_s16_224", 32, {"img_size": 32}),
    ("poolformer_s12", 32, {}),
    ("levit_128s", 64, {"img_size": 64}),
    ("repvgg_a0", 32, {}),
    ("ghostnet_100", 32, {}),
)}
ARCHS.update(TIMM)


# ----------------------------------------------------------------------------- export, run, compare
def export(wrapped, inputs, exporter, dynamic_batch=False):
    """``dynamic_batch`` (TorchScript only): axis 0 of every input is the symbol ``batch``."""
    names = list(inputs)
    args = tuple(inputs.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(wrapped, args, buf, dynamo=False, opset_version=17, input_names=names,
                              output_names=[OUT], do_constant_folding=False,
                              dynamic_axes={n: {0: "batch"} for n in names} if dynamic_batch else None,
                              training=torch.onnx.TrainingMode.PRESERVE)
            return onnx.load_from_string(buf.getvalue())
        prog = torch.onnx.export(wrapped, args, dynamo=True, opset_version=18, input_names=names,
                                 output_names=[OUT], optimize=False, verbose=False, report=False)
        return prog.model_proto


def run_arch(arch, exporter, dynamic_batch=False):
    torch.manual_seed(0)
    model, inputs, pick = ARCHS[arch]()
    model = _distinct(model.eval())
    wrapped = _One(model, list(inputs), pick).eval()
    proto = export(wrapped, inputs, exporter, dynamic_batch)
    float_inputs = [k for k, v in inputs.items() if v.is_floating_point()]
    gm = onnxbp.gradient(proto, None)
    params = list(gradient_names(gm))
    if float_inputs:
        gm = onnxbp.gradient(proto, params + float_inputs)
    assert_standard(gm)
    names = gradient_names(gm)
    onnx_inputs = [i.name for i in proto.graph.input]
    feeds = {k: v.numpy() for k, v in inputs.items() if k in onnx_inputs}
    y = session(proto).run([OUT], feeds)[0]
    rng = np.random.default_rng(0)
    u = rng.standard_normal(y.shape).astype(np.float32)
    fetch = [OUT] + list(names.values())
    res = dict(zip(fetch, session(gm).run(fetch, {**feeds, OUT + "_grad": u})))

    tin = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    model.zero_grad(set_to_none=True)
    yt = wrapped(*tin.values())
    yt.backward(torch.from_numpy(u))
    assert_close(res[OUT], yt.detach().numpy(), 1e-4, 1e-6, f"{arch} forward")

    tparams = dict(wrapped.named_parameters())
    mapping = param_map(proto, wrapped)
    pairs = [(k, res[names[k]], tin[k].grad.numpy()) for k in float_inputs if k in onnx_inputs]
    for init, (tname, transposed) in mapping.items():
        if init not in names or not tparams[tname].requires_grad:
            # an initializer no gradient reaches (an unused parameter: torch's grad is None), or a
            # frozen one (Whisper's sinusoidal positions, requires_grad=False): nothing to compare
            continue
        tg = tparams[tname].grad
        tg = np.zeros(tuple(tparams[tname].shape), np.float32) if tg is None else tg.numpy()
        pairs.append((init, res[names[init]], tg.T if transposed else tg))
    with_grad = {k for k, p in tparams.items() if p.grad is not None and p.requires_grad}
    missing = sorted(with_grad - {mapping[i][0] for i in mapping if i in names})
    assert not missing, f"{arch}/{exporter}: torch parameters without an ONNX gradient: {missing}"
    big = max(float(np.max(np.abs(ref))) for _, _, ref in pairs if ref.size)
    floor = 1e-3 * big
    worst = 0.0
    for name, ours, ref in pairs:
        assert ours.shape == ref.shape, f"{arch} d{name}: shape {ours.shape} != {ref.shape}"
        err = float(np.max(np.abs(ours.astype(np.float64) - ref)))
        rel = err / max(float(np.max(np.abs(ref))), floor)
        assert rel <= RTOL, f"{arch}/{exporter} d{name}: error {err:.3e} > {RTOL} * max(|ref|, 1e-3 G = {floor:.3e})"
        _record("reference (torch)", rel)
        worst = max(worst, rel)
    return {"worst": worst, "compared": len(pairs), "params": len(with_grad), "nodes": len(proto.graph.node)}


# ----------------------------------------------------------------------------- the cases
#: (architecture, exporter) -> the exact reason, for combinations that do not pass (an exporter's
#: limitation; counted in docs/networks.md).  None today: all 62 pass.
XFAIL: dict = {}

#: the default run: fast architectures, one exporter each (the rest is slow); swin, mobilenet_v2,
#: poolformer and tv_vit are the ones that needed shape folding (Slice axes, F.pad's pads, Unsqueeze
#: by Range, Mod in MultiheadAttention's unflatten); detr (5-8 s) is slow
DEFAULT = {("bert", "torchscript"), ("gpt2", "dynamo"), ("t5_encoder", "torchscript"),
           ("whisper_encoder", "torchscript"), ("vit", "dynamo"), ("swin", "torchscript"),
           ("mobilenet_v2", "torchscript"), ("poolformer", "dynamo"), ("resnet", "torchscript"),
           ("convnext", "dynamo"), ("timm_resnet18", "torchscript"), ("timm_ghostnet_100", "torchscript"),
           ("tv_vit", "torchscript")}

CASES = [(a, e) for a in ARCHS for e in ("torchscript", "dynamo")]


def _param(a, e):
    marks = [] if (a, e) in DEFAULT else [pytest.mark.slow]
    if (a, e) in XFAIL:
        marks.append(pytest.mark.xfail(reason=XFAIL[(a, e)], strict=True))
    return pytest.param(a, e, id=f"{a}-{e}", marks=marks)


@pytest.mark.torch
@pytest.mark.parametrize("arch,exporter", [_param(a, e) for a, e in CASES])
def test_architecture_vs_torch(arch, exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    r = run_arch(arch, exporter)
    assert r["compared"] >= r["params"] and r["worst"] <= RTOL


#: exported with a symbolic batch (TorchScript ``dynamic_axes``): onnx's inference then names the
#: batch afresh after each Expand/Tile/Resize/Range ("unk__N") and used to lose MultiheadAttention's
#: rank (tv_vit) and DETR's broadcast axes ("cannot tell which axes of ('unk__82', 2, 'unk__83', 4)
#: were broadcast"); detr takes 5-8 s: slow
DYNAMIC = [pytest.param("tv_vit", id="tv_vit"), pytest.param("vit", id="vit"),
           pytest.param("detr", id="detr", marks=pytest.mark.slow)]


@pytest.mark.torch
@pytest.mark.parametrize("arch", DYNAMIC)
def test_architecture_dynamic_batch_vs_torch(arch):
    r = run_arch(arch, "torchscript", dynamic_batch=True)
    assert r["compared"] >= r["params"] and r["worst"] <= RTOL


if __name__ == "__main__":  # python tests/test_architectures.py [arch ...]: the table for docs/networks.md
    import time

    for a in sys.argv[1:] or list(ARCHS):
        for e in ("torchscript", "dynamo"):
            t0 = time.perf_counter()
            try:
                r = run_arch(a, e)
                print(f"| {a} | {e} | {r['nodes']} | {r['compared']} | {r['worst']:.1e} | {time.perf_counter() - t0:.1f} |",
                      flush=True)
            except BaseException as ex:  # noqa: BLE001
                print(f"| {a} | {e} | FAIL {type(ex).__name__}: {str(ex).splitlines()[0][:300]} |", flush=True)

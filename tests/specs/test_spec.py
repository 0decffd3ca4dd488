"""Specs: every spec file is valid and has a fixture; detection, dims and error cases."""

import json
import re
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, MODELS, edited_fixture
from safetensors.numpy import load_file, save_file

from qkweights.checkpoints.source import resolve
from qkweights.checkpoints.tensors import TensorStore
from qkweights.errors import CheckpointError, SpecError
from qkweights.specs.checkpoint import open_checkpoint
from qkweights.specs.registry import load_specs

# fixture -> (family, prefix, layers, heads, hidden); from tests/fixtures/README.md
EXPECTED = {
    "vit": ("hf-vit", "", 2, 4, 32),
    "vit-cls": ("hf-vit", "vit.", 2, 4, 32),
    "vit-bf16": ("hf-vit", "", 2, 4, 32),
    "vit-f16": ("hf-vit", "", 2, 4, 32),
    "vit-h3": ("hf-vit", "", 2, 3, 48),
    "deit": ("hf-deit", "deit.", 2, 4, 32),
    "clip": ("hf-clip", "vision_model.", 2, 4, 32),
    "clip-vision": ("hf-clip", "vision_model.", 2, 4, 32),
    "dinov2": ("hf-dinov2", "", 2, 4, 32),
    "dinov2-reg": ("hf-dinov2", "", 2, 4, 32),
    "dinov2-swiglu": ("hf-dinov2", "", 2, 4, 32),
    "ijepa": ("hf-ijepa", "", 2, 4, 32),
    "bert": ("hf-bert", "", 2, 4, 32),
    "roberta-mlm": ("hf-bert", "roberta.", 2, 4, 32),
    "timm-vit": ("timm-vit", "", 2, 3, 48),
    "timm-vit-reg": ("timm-vit", "", 2, 4, 32),
    "open-clip": ("open-clip", "visual.", 2, 4, 32),
    "deit-h3": ("hf-deit", "deit.", 2, 3, 48),
    "timm-deit": ("timm-deit", "", 2, 3, 48),
    "timm-beit": ("timm-beit", "", 2, 4, 32),
    # the other transformers classes, built from a config and saved by transformers 5 (make_fixtures.build_small)
    "clip-vision-bare": ("hf-clip", "", 2, 2, 16),
    "deit-model": ("hf-deit", "", 2, 2, 16),
    "dinov2-cls": ("hf-dinov2", "dinov2.", 2, 2, 16),
    "dinov2-reg-cls": ("hf-dinov2", "dinov2_with_registers.", 2, 2, 16),
    "ijepa-cls": ("hf-ijepa", "ijepa.", 2, 2, 16),
}

# PyTorch research fixtures (tests/fixtures/make_pickle_models.py, make_simmim_fixtures.py): path, part -> expectations
PICKLE_EXPECTED = {
    ("pickles/simmim-pretrain/ckpt_epoch_5.pth", None): ("simmim-vit", "model.encoder.", 2, 4, 32),
    ("pickles/simmim-finetune/ckpt.pth", None): ("simmim-vit", "model.", 2, 4, 32),
    ("pickles/ijepa-research/IN1K-vit-tiny.pth.tar", None): ("timm-vit", "", 2, 4, 32),
    ("pickles/ijepa-research/IN1K-vit-tiny.pth.tar", "predictor"): ("ijepa-predictor", "", 3, 2, 48),
    ("pickles/dino-like/dino_vit_pretrain.pth", None): ("timm-vit", "", 2, 3, 48),
    ("pickles/vit-training/checkpoint.pth", None): ("hf-vit", "model.", 2, 4, 32),
}


def open_fixture(name, family=None):
    src = resolve(str(MODELS / name))
    return open_checkpoint(TensorStore.open(src.weight_files), src.config_files, family=family)


def test_every_fixture_is_listed():
    assert sorted(EXPECTED) == sorted(p.name for p in MODELS.iterdir())


@pytest.mark.parametrize("spec", sorted(load_specs()), ids=str)
def test_spec_file_is_complete_and_has_a_fixture(spec):
    s = load_specs()[spec]
    assert s.example and s.description and s.detect.require
    assert None not in (s.dims.layers, s.dims.hidden, s.dims.heads)
    assert s.attention.qkv is not None or None not in (s.attention.q, s.attention.k)
    if s.modality == "vision":
        assert None not in (s.block.norm1, s.block.norm2, s.embeddings.patch) and "patches" in s.embeddings.tokens
    families = {f for f, *_ in EXPECTED.values()} | {f for f, *_ in PICKLE_EXPECTED.values()}
    assert spec in families, f"add a fixture for {spec} to tests/fixtures/make_fixtures.py"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_detection_and_dims(name):
    ck = open_fixture(name)
    family, prefix, layers, heads, hidden = EXPECTED[name]
    assert (ck.spec.name, ck.prefix, ck.dims.layers, ck.dims.heads, ck.dims.hidden) == (
        family,
        prefix,
        layers,
        heads,
        hidden,
    )
    assert ck.dims.head_dim * ck.dims.heads == ck.dims.hidden


@pytest.mark.parametrize("path, part", sorted(PICKLE_EXPECTED, key=str))
def test_detection_of_pytorch_research_checkpoints(path, part, capsys):
    from qkweights.specs.load import open_model

    _, ck = open_model(str(FIXTURES / path), part=part)
    assert (ck.spec.name, ck.prefix, ck.dims.layers, ck.dims.heads, ck.dims.hidden) == PICKLE_EXPECTED[path, part]


def test_dims_details():
    assert open_fixture("clip").dims.act == "quick_gelu" and open_fixture("open-clip").dims.act == "quick_gelu"
    assert open_fixture("timm-vit").dims.eps == 1e-6 and open_fixture("timm-vit").dims.image_size == (32, 32)
    assert open_fixture("open-clip").dims.eps == 1e-5
    assert open_fixture("dinov2-swiglu").dims.swiglu and not open_fixture("dinov2").dims.swiglu
    assert open_fixture("vit").dims.eps == 1e-12 and open_fixture("vit").dims.patch_size == 8


@pytest.mark.parametrize("fused, separate", [("timm-vit", "vit-h3"), ("open-clip", "clip"), ("timm-deit", "deit-h3")])
def test_fused_qkv_rows_equal_separate_projections(fused, separate):
    # The timm/open_clip fixtures hold the same weights as their HF sources (make_fixtures.py renames them).
    for l in range(2):
        a, b = open_fixture(fused).qk(l), open_fixture(separate).qk(l)
        for field in ("wq", "wk", "bq", "bk"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_per_head_rows_follow_the_out_in_layout():
    ck = open_fixture("vit")
    raw = load_file(str(MODELS / "vit" / "model.safetensors"))
    wq = raw["encoder.layer.1.attention.attention.query.weight"]
    np.testing.assert_array_equal(ck.qk(1).wq[2], wq[16:24])  # head 2 = rows 2·8 … 3·8−1


def copy_fixture(tmp_path, name):
    return shutil.copytree(MODELS / name, tmp_path / name)


def test_family_override_that_does_not_fit(tmp_path):
    with pytest.raises(
        SpecError,
        match=(
            r"^the checkpoint is not of family 'hf-deit': it lacks one of embeddings.cls_token, "
            r"embeddings.distillation_token"
        ),
    ):
        open_fixture("vit", family="hf-deit")
    with pytest.raises(SpecError) as e:
        open_fixture("vit", family="hf_dinov2")
    assert str(e.value) == (
        "unknown family 'hf_dinov2' (closest: hf-dinov2, hf-deit, hf-vit); `python -m qkweights specs` lists them all"
    )


def test_unknown_checkpoint_names_the_three_closest_families(tmp_path):
    # A ViT whose blocks were renamed: the message names three families, not all of them, and what the closest lacks.
    raw = load_file(str(MODELS / "vit" / "model.safetensors"))
    save_file(
        {k.replace("encoder.layer.", "encoder.block."): v for k, v in raw.items()}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(SpecError) as e:
        open_checkpoint(TensorStore.open([tmp_path / "model.safetensors"]), {})
    assert str(e.value) == (
        "unknown checkpoint: no family matches its tensors (closest: hf-vit, which lacks "
        "encoder.layer.0.layernorm_before.weight, hf-ijepa, hf-deit); pass family=NAME "
        "(`python -m qkweights specs` lists them) or add a spec file"
    )
    save_file({"foo.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SpecError) as e:
        open_checkpoint(TensorStore.open([tmp_path / "model.safetensors"]), {})
    assert len(str(e.value)) < 250 and str(e.value).count("hf-") + str(e.value).count("-vit") <= 4


TF5_HINT = (
    "transformers ≥ 5 in-memory names ({name}), not the names save_pretrained writes; "
    "save the model with save_pretrained() instead of torch.save(state_dict)"
)


@pytest.mark.parametrize("family", [None, "hf-deit", "hf-vit"])
def test_transformers_5_state_dict_is_refused_with_one_short_line(family):
    # tests/fixtures/pickles/tf5-state-dict/model.pth: torch.save(DeiTModel.state_dict()) under transformers 5.24
    from qkweights.specs.load import open_model

    with pytest.raises(SpecError) as e:
        open_model(str(FIXTURES / "pickles/tf5-state-dict/model.pth"), family=family)
    assert str(e.value) == TF5_HINT.format(name="layers.0.attention.q_proj.weight")
    assert len(str(e.value)) < 200


def test_transformers_5_state_dict_names_of_dinov2_under_a_prefix(tmp_path):
    # In-memory names of Dinov2ForImageClassification in transformers 5.24 (model.state_dict() keys): the files'
    # encoder.layer.{i}.attention.attention.query becomes encoder.layer.{i}.attention.q_proj.
    raw = load_file(str(MODELS / "dinov2-cls" / "model.safetensors"))
    renamed = {
        k.replace("attention.attention.query", "attention.q_proj").replace(
            "attention.attention.key", "attention.k_proj"
        ): v
        for k, v in raw.items()
    }
    save_file(renamed, str(tmp_path / "model.safetensors"))
    with pytest.raises(SpecError) as e:
        open_checkpoint(TensorStore.open([tmp_path / "model.safetensors"]), {})
    assert str(e.value) == TF5_HINT.format(name="dinov2.encoder.layer.0.attention.q_proj.weight")


def test_heads_not_dividing_the_width(tmp_path):
    folder = copy_fixture(tmp_path, "vit")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_attention_heads"] = 5
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"^hf-vit: 5 heads \(config.json num_attention_heads\) do not divide the width 32 \(config.json "
        r"hidden_size\); fix the config or choose another family=NAME$",
    ):
        open_fixture_path(folder)


def open_fixture_path(folder):
    src = resolve(str(folder))
    return open_checkpoint(TensorStore.open(src.weight_files), src.config_files)


def test_missing_tensor(tmp_path):
    folder = copy_fixture(tmp_path, "vit")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["encoder.layer.1.attention.attention.key.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    ck = open_fixture_path(folder)
    ck.qk(0)
    with pytest.raises(
        CheckpointError,
        match=r"^tensor 'encoder.layer.1.attention.attention.key.weight' is missing from model.safetensors",
    ):
        ck.qk(1)


def test_config_that_does_not_fit_the_tensors(tmp_path):
    folder = copy_fixture(tmp_path, "vit")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layer 0 q weight has shape \(32, 32\), expected \(64, 64\)"):
        open_fixture_path(folder).qk(0)


@pytest.mark.parametrize(
    "fixture, name, what, width",
    [
        ("vit", "encoder.layer.0.attention.attention.query.bias", "q bias", 32),  # a separate query module
        ("timm-vit", "blocks.0.attn.qkv.bias", "qkv bias", 3 * 48),  # the fused qkv module
        ("timm-beit", "blocks.0.attn.q_bias", "q_bias", 32),  # a separate bias tensor overriding the module's
    ],
)
def test_a_query_bias_that_does_not_fit_the_width_is_named(tmp_path, fixture, name, what, width):
    folder = copy_fixture(tmp_path, fixture)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name] = tensors[name][:-1]  # one entry short
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=rf"layer 0 {what} has shape \({width - 1},\), expected \({width},\) from the width "
    ):
        open_fixture_path(folder).qk(0)


def test_timm_heads_from_the_architecture_name(tmp_path):
    folder = copy_fixture(tmp_path, "timm-vit")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architecture"] = "vit_small_patch8_32"  # small = 6 heads: 48 / 6 = 8
    (folder / "config.json").write_text(json.dumps(cfg))
    assert open_fixture_path(folder).dims.heads == 6


class ShapeStore:
    """Tensor names and shapes only: dimension resolution reads nothing else (so a ViT-G's shapes cost no memory)."""

    def __init__(self, shapes):
        self.shapes = shapes

    def names(self):
        return list(self.shapes)

    def __contains__(self, name):
        return name in self.shapes

    def shape(self, name):
        return self.shapes[name]


def timm_shapes(width, depth=2, patch=16):
    shapes = {
        "patch_embed.proj.weight": (width, 3, patch, patch),
        "cls_token": (1, 1, width),
        "pos_embed": (1, 197, width),
    }
    for i in range(depth):
        shapes[f"blocks.{i}.attn.qkv.weight"] = (3 * width, width)
    return shapes


def timm_heads(tmp_path, width, architecture=None):
    files = {}
    if architecture is not None:
        (tmp_path / "config.json").write_text(json.dumps({"architecture": architecture}))
        files["config.json"] = tmp_path / "config.json"
    return open_checkpoint(ShapeStore(timm_shapes(width)), files, family="timm-vit").dims.heads


# num_heads of timm's registered models (timm/models/vision_transformer.py, `model_args` of each @register_model)
TIMM_BY_WIDTH = [
    ("vit_tiny_patch16_224", 192, 3),
    ("vit_small_patch16_224", 384, 6),
    ("vit_medium_patch16_gap_256", 512, 8),
    ("vit_base_patch16_224", 768, 12),
    ("vit_base_patch16_plus_240", 896, 14),
    ("vit_large_patch16_224", 1024, 16),
    ("vit_so400m_patch14_siglip_224", 1152, 16),
    ("vit_huge_patch14_224", 1280, 16),
    ("vit_giant_patch14_clip_224", 1408, 16),
    ("vit_giant_patch14_dinov2", 1536, 24),
    ("vit_gigantic_patch14_clip_224", 1664, 16),
]


@pytest.mark.parametrize("architecture, width, heads", TIMM_BY_WIDTH)
def test_timm_heads_of_registered_models(tmp_path, architecture, width, heads):
    assert timm_heads(tmp_path, width, f"{architecture}.some_tag") == heads  # a Hub repo's config.json
    assert timm_heads(tmp_path, width) == heads  # a research state dict: no config, the width decides


# Widths outside the table (a tiny model): the size word of the architecture name decides.
TIMM_BY_NAME = [
    ("vit_tiny_patch16_224", 3),
    ("vit_small_patch14_dinov2.lvd142m", 6),
    ("vit_medium_patch16_reg4_gap_256", 8),
    ("vit_base_patch16_224.augreg2_in21k_ft_in1k", 12),
    ("vit_large_patch14_clip_224.openai", 16),
    ("vit_huge_patch14_clip_224.laion2b", 16),
    ("vit_giant_patch14_reg4_dinov2.lvd142m", 24),
    ("vit_gigantic_patch14_clip_224.laion2b", 16),
]


@pytest.mark.parametrize("architecture, heads", TIMM_BY_NAME)
def test_timm_heads_from_the_size_word(tmp_path, architecture, heads):
    assert timm_heads(tmp_path, 48, architecture) == heads  # 48 is divisible by every count and in no table
    with pytest.raises(SpecError, match=r"^timm-vit: no config.json beside the weights; the head count"):
        timm_heads(tmp_path, 48)  # no architecture name either: the heads cannot be known


def test_broken_spec_file(tmp_path):
    (tmp_path / "x.toml").write_text('name = "y"\ndescription = ""\nexample = ""\n[dims]\n[attention]\n')
    with pytest.raises(SpecError, match=r"^x.toml: name 'y' differs from the file name"):
        load_specs(tmp_path)
    (tmp_path / "x.toml").write_text('name = "x"\n')
    with pytest.raises(SpecError, match=r"^x.toml: missing required key 'description'"):
        load_specs(tmp_path)


def edited_config(tmp_path, **changes):
    folder = copy_fixture(tmp_path, "vit")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"num_attention_heads": "four"},
            'config.json num_attention_heads is "four"; it must be a positive integer (heads); fix the config',
        ),
        (
            {"layer_norm_eps": "x"},
            'config.json layer_norm_eps is "x"; it must be a number between 0 and 1 (eps); fix the config',
        ),
        ({"num_hidden_layers": 2.5}, "config.json num_hidden_layers is 2.5; it must be a positive integer (layers)"),
        ({"num_attention_heads": 0}, "config.json num_attention_heads is 0; it must be a positive integer (heads)"),
        ({"patch_size": None}, "config.json patch_size is not usable; it must be a positive integer (patch_size)"),
        ({"hidden_act": 3}, 'config.json hidden_act is 3; it must be a text such as "gelu" (act)'),
        (
            {"image_size": [32, "x"]},
            'config.json image_size is [32, "x"]; it must be a positive integer or a list [height, width]',
        ),
    ],
)
def test_config_values_of_the_wrong_type_name_the_key(tmp_path, capsys, changes, message):
    folder = edited_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match="^hf-vit: " + re.escape(message)):
        open_fixture_path(folder)
    from qkweights.cli import main

    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qkweights: error: hf-vit: {message}") and err.count("\n") == 1


def test_whole_number_floats_are_integers(tmp_path):
    assert open_fixture_path(edited_config(tmp_path, num_attention_heads=4.0)).dims.heads == 4


@pytest.mark.parametrize("layers, held", [(1, "2 layers"), (3, "2 layers")])
def test_config_layer_count_must_match_the_tensors(tmp_path, layers, held):
    folder = edited_config(tmp_path, num_hidden_layers=layers)
    with pytest.raises(
        CheckpointError,
        match=rf"^hf-vit: config.json num_hidden_layers is {layers}, but the weight files hold {held} "
        r"\(encoder.layer.N.attention.attention.query.weight\); fix the config",
    ):
        open_fixture_path(folder)


def test_single_safetensors_file_without_config_asks_for_it(tmp_path):
    shutil.copy(MODELS / "vit" / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(
        SpecError,
        match=r"^hf-vit: no config.json beside the weights; the head count \(num_attention_heads\) cannot be "
        r"read from the tensors: put the model's config.json next to the weight file, or pass the folder that "
        r"holds both$",
    ):
        open_fixture_path(tmp_path / "model.safetensors")


def test_timm_beit_is_told_from_simmim_by_its_config(tmp_path):
    # The same tensor names (make_fixtures.hf_beit_to_timm): timm's config.json decides; without it the tensors
    # alone are SimMIM's research layout, as before timm-beit existed.
    import qkweights

    ck = open_fixture("timm-beit")
    assert (ck.spec.name, ck.spec.logit_terms) == ("timm-beit", ("relative position bias",))
    assert qkweights.profile(str(MODELS / "timm-beit")).model.omitted[-1] == "relative position bias"
    shutil.copy(MODELS / "timm-beit" / "model.safetensors", tmp_path / "model.safetensors")
    assert open_fixture_path(tmp_path / "model.safetensors").spec.name == "simmim-vit"
    assert open_checkpoint(TensorStore.open([tmp_path / "model.safetensors"]), {}, family="timm-beit").dims.heads == 4


def test_timm_vit_refuses_a_distilled_deit_and_timm_deit_reads_it():
    # Before timm-deit, the distillation token made timm-vit fail ("the position table's 17 patch rows form no
    # square grid"); now the dist_token is a signature of its own family.
    with pytest.raises(SpecError, match=r"^the checkpoint is not of family 'timm-vit'"):
        open_fixture("timm-deit", family="timm-vit")
    ck = open_fixture("timm-deit")
    assert ck.spec.embeddings.tokens == ("cls", "dist", "patches") and ck.dims.eps == 1e-6


def test_a_relative_position_table_of_another_head_count_names_where_the_count_came_from(tmp_path):
    import qkweights

    def three_heads(t):
        t["blocks.1.attn.relative_position_bias_table"] = t["blocks.1.attn.relative_position_bias_table"][:, :3].copy()

    with pytest.raises(CheckpointError) as e:
        qkweights.load_model(str(edited_fixture(tmp_path, "beit", three_heads, name="timm-beit")))
    assert str(e.value) == (
        "timm-beit: relative position table blocks.1.attn.relative_position_bias_table has shape (52, 3), expected "
        "(52, 4): 52 rows for a 4×4 patch grid, 4 heads (blocks.0.attn.relative_position_bias_table shape[1]); fix "
        "[dims] heads in timm-beit.toml or choose another family=NAME"
    )
